"""The two public checkpoint layouts, detected automatically.

official (Wan-AI/Wan2.2-T2V-A14B)         diffusers (Wan-AI/Wan2.2-T2V-A14B-Diffusers)
  high_noise_model/ config.json + shards     model_index.json
  low_noise_model/  config.json + shards     transformer/   (high-noise expert) config.json + shards
  models_t5_umt5-xxl-enc-bf16.pth            transformer_2/ (low-noise expert)
  Wan2.1_VAE.pth                             text_encoder/  tokenizer/  vae/  scheduler/
  google/umt5-xxl/ (tokenizer)

Architecture comes from each component's config.json or tensor shapes, never from a name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from wanfast.config import DiTConfig
from wanfast.loading import dit_keys, fp8_checkpoint, vae_keys
from wanfast.loading.checkpoint import (
    CheckpointError,
    load_module,
    read_json,
    read_pth,
    read_safetensors,
    require_file,
    safetensors_files,
)
from wanfast.models.dit import WanDiT
from wanfast.models.text_encoder import TextEncoder, load_diffusers_text_encoder, load_official_text_encoder
from wanfast.models.vae import WanVAE

DIT_WEIGHTS = "diffusion_pytorch_model"
OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_VAE = "Wan2.1_VAE.pth"
OFFICIAL_TOKENIZER = "google/umt5-xxl"


@dataclass(frozen=True)
class CheckpointLayout:
    """Where each component of a two-expert T2V checkpoint lives."""

    kind: str  # "official" | "diffusers"
    high_noise: Path
    low_noise: Path
    text_encoder: Path
    tokenizer: Path
    vae: Path
    boundary: float | None = None  # from model_index.json's boundary_ratio, when the layout records it


def detect_layout(ckpt_dir: str | os.PathLike) -> CheckpointLayout:
    """Find the layout of ``ckpt_dir`` and check that each component is present (no weights are read)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {root}")
    if (root / "model_index.json").is_file():
        index = read_json(root / "model_index.json", "Diffusers model index")
        for sub in ("transformer", "transformer_2", "text_encoder", "tokenizer", "vae"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"Diffusers layout: folder {sub}/ missing in {root}")
        return CheckpointLayout(
            kind="diffusers",
            high_noise=root / "transformer",
            low_noise=root / "transformer_2",
            text_encoder=root / "text_encoder",
            tokenizer=root / "tokenizer",
            vae=root / "vae",
            boundary=index.get("boundary_ratio"),
        )
    if (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir():
        for sub in ("high_noise_model", "low_noise_model", OFFICIAL_TOKENIZER):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"official layout: folder {sub}/ missing in {root}")
        require_file(root / OFFICIAL_T5, "official layout: T5 checkpoint")
        require_file(root / OFFICIAL_VAE, "official layout: VAE checkpoint")
        return CheckpointLayout(
            kind="official",
            high_noise=root / "high_noise_model",
            low_noise=root / "low_noise_model",
            text_encoder=root / OFFICIAL_T5,
            tokenizer=root / OFFICIAL_TOKENIZER,
            vae=root / OFFICIAL_VAE,
        )
    raise CheckpointError(
        f"{root} is neither the official Wan2.2 layout (high_noise_model/, low_noise_model/, "
        f"{OFFICIAL_T5}, {OFFICIAL_VAE}) nor the Diffusers layout (model_index.json, transformer/, ...)"
    )


def dit_config(path: str | os.PathLike) -> tuple[DiTConfig, str]:
    """Architecture and layout ("official" | "diffusers") of one expert folder, from its config.json."""
    cfg = read_json(Path(path) / "config.json", "transformer config")
    if "num_attention_heads" in cfg or cfg.get("_class_name") == "WanTransformer3DModel":
        return dit_keys.config_from_diffusers_json(cfg), "diffusers"
    if "dim" in cfg and "num_heads" in cfg:
        return dit_keys.config_from_official_json(cfg), "official"
    raise CheckpointError(f"{path}/config.json is neither an official WanModel nor a Diffusers config")


def load_transformer(
    path: str | os.PathLike, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16
) -> WanDiT:
    """One DiT expert from an official expert folder or a Diffusers ``transformer*/`` folder."""
    if fp8_checkpoint.is_fp8_checkpoint(path):  # written by `wanfast quantize`
        return fp8_checkpoint.load_fp8_transformer(path, device, dtype)
    cfg, kind = dit_config(path)
    files = safetensors_files(path, DIT_WEIGHTS)
    sd = read_safetensors(files)
    if kind == "diffusers":
        sd = dit_keys.diffusers_to_official(sd)
    # The modulation tables are consumed in fp32 (as the official autocast regions do): keep them fp32.
    return load_module(
        lambda: WanDiT(cfg),
        sd,
        device,
        dtype,
        f"transformer {path}",
        keep_fp32=lambda n: n.endswith("modulation"),
    )


def load_vae(
    path: str | os.PathLike, device: str | torch.device = "cuda", dtype: torch.dtype = torch.float32
) -> WanVAE:
    """The Wan2.1 VAE from ``Wan2.1_VAE.pth`` (or a folder holding it) or a Diffusers ``vae/`` folder."""
    p = Path(path)
    if p.is_dir() and (p / OFFICIAL_VAE).is_file():
        p = p / OFFICIAL_VAE
    if p.is_dir():
        cfg = vae_keys.config_from_diffusers_json(read_json(p / "config.json", "VAE config"))
        sd = vae_keys.diffusers_to_official(read_safetensors(safetensors_files(p, DIT_WEIGHTS)))
    else:
        sd = read_pth(p, "VAE checkpoint")
        cfg = vae_keys.config_from_state_dict(sd)
    return load_module(lambda: WanVAE(cfg), sd, device, dtype, f"VAE {p}")


def load_text_encoder(
    path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    text_len: int = 512,
) -> TextEncoder:
    """UMT5 encoder from the official ``.pth`` or a Diffusers ``text_encoder/`` folder, plus its tokenizer.
    Prompts are cut at ``text_len`` tokens (the DiT's context length, 512 for Wan2.2)."""
    p = Path(path)
    if not Path(tokenizer_path).is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {tokenizer_path}")
    if p.is_dir():
        return load_diffusers_text_encoder(p, tokenizer_path, device, dtype, text_len=text_len)
    return load_official_text_encoder(p, tokenizer_path, device, dtype, text_len=text_len)
