"""Loading the UMT5 text encoder: the official ``.pth`` or a Diffusers ``text_encoder/`` folder, plus its
tokenizer. Builds ``transformers.UMT5EncoderModel`` on the meta device and assigns the weights into it
(``wanfast.models.text_encoder.TextEncoder`` wraps it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from wanfast.config import TextEncoderConfig
from wanfast.loading.checkpoint import (
    CheckpointError,
    check_state_dict,
    read_json,
    read_pth,
    safetensors_files,
)
from wanfast.loading.t5_keys import (
    config_from_hf,
    config_from_official_state_dict,
    hf_config,
    official_to_hf,
    tie_hf_embeddings,
)
from wanfast.models.text_encoder import TextEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def import_backend() -> None:
    """Import what building the encoder needs from transformers (seconds: torch._dynamo, scipy, ...). The
    builder calls it on its main thread before the loads start: run in the loader thread beside the
    experts' reads it made the build 11 s longer on the H200 host (2026-11-30; the import holds the GIL
    against the reads' Python loops), more than the 7.7 s it takes alone."""
    from transformers import AutoTokenizer, UMT5EncoderModel  # noqa: F401


def build_text_encoder(
    cfg: TextEncoderConfig,
    state_dict_hf: dict[str, torch.Tensor],
    tokenizer: PreTrainedTokenizerBase,
    device: str | torch.device,
    dtype: torch.dtype,
    *,
    attn_implementation: str = "sdpa",
    pad_to_text_len: bool = True,
) -> TextEncoder:
    """Build ``UMT5EncoderModel`` on the meta device and assign the weights into it, strictly.

    Each tensor is moved to ``device``/``dtype`` on its own (so an mmap'd checkpoint never becomes a
    full extra CPU copy) and the tied embedding is converted once and shared by both of its keys."""
    from transformers import UMT5EncoderModel  # here, not at the top: see loading.layout.load_text_encoder

    with torch.device("meta"):
        model = UMT5EncoderModel(hf_config(cfg, attn_implementation))
    ref = model.state_dict()
    sd = tie_hf_embeddings(state_dict_hf)
    check_state_dict(ref, sd, "text encoder weights (UMT5EncoderModel)")
    converted: dict[int, torch.Tensor] = {}  # id(source) -> converted, so tied keys stay one tensor
    out = {}
    for name, t in sd.items():
        if id(t) not in converted:
            converted[id(t)] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        out[name] = converted[id(t)]
    model.load_state_dict(out, strict=True, assign=True)
    still_meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if still_meta:
        raise CheckpointError(f"text encoder tensors left uninitialised after loading: {still_meta[:4]}")
    model.eval().requires_grad_(False)
    return TextEncoder(model, tokenizer, cfg, device, pad_to_text_len)


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder only; a missing folder must not turn into a hub download."""
    from transformers import AutoTokenizer

    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {e}") from e


def load_official_text_encoder(
    pth_path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    text_len: int = 512,
) -> TextEncoder:
    """``models_t5_umt5-xxl-enc-bf16.pth`` (memory-mapped) plus the ``google/umt5-xxl`` tokenizer folder."""
    sd = read_pth(pth_path, "T5 encoder checkpoint")
    try:
        cfg = config_from_official_state_dict(sd, text_len=text_len)
        sd_hf = official_to_hf(sd)
    except ValueError as e:
        raise CheckpointError(f"{pth_path}: {e}") from e
    return build_text_encoder(cfg, sd_hf, load_tokenizer(tokenizer_dir), device, dtype)


def read_safetensors_to(
    files: list[Path], device: str | torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every tensor of every shard, read straight onto ``device`` (a CUDA load skips a CPU copy) and
    cast there one at a time, so a float32 file never sits on the device whole in float32."""
    sd = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    sd[key] = t.to(dtype) if t.is_floating_point() else t
        except Exception as e:  # safetensors raises its own error type (truncated, corrupt header)
            raise CheckpointError(f"cannot read safetensors file {path} (truncated or corrupt?): {e}") from e
    return sd


def load_diffusers_text_encoder(
    text_encoder_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    text_len: int = 512,
) -> TextEncoder:
    """A Diffusers ``text_encoder/`` folder (config.json + single or sharded safetensors) and ``tokenizer/``."""
    folder = Path(text_encoder_dir)
    config = read_json(folder / "config.json", "text encoder config")
    try:
        cfg = config_from_hf(config, text_len=text_len)
    except ValueError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from e
    sd = read_safetensors_to(safetensors_files(folder, "model"), device, dtype)
    return build_text_encoder(cfg, sd, load_tokenizer(tokenizer_dir), device, dtype)
