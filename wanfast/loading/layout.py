"""The public checkpoint layouts, detected from what a folder holds; the model spec with them.

official, two experts (Wan2.2-T2V-A14B, -I2V-A14B)   official, one DiT (Wan2.2-TI2V-5B)
  high_noise_model/ low_noise_model/ (config+shards)     config.json + diffusion_pytorch_model shards
  models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/      models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/
  Wan2.1_VAE.pth                                         Wan2.2_VAE.pth

diffusers (Wan2.2-*-Diffusers): model_index.json, transformer/ (high noise or the only DiT),
  transformer_2/ (low noise, two-expert models), text_encoder/, tokenizer/, vae/, scheduler/

``detect(folder)`` returns (the ``ModelSpec``, the ``CheckpointPaths``) reading config files and tensor
headers only, never weights, and never deciding anything from a folder's name: the model family comes from
the number of experts, the DiT's input channels against the VAE's latent channels (``in_dim == z_dim``:
text or text+image through the first frame; ``2 * z_dim + 4``: image channels concatenated) and its
``model_type`` where the config records one; the architecture from the configs and tensor shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wanfast.config import ConfigError, DiTConfig
from wanfast.loading import dit_keys, vae_keys
from wanfast.loading.checkpoint import (
    CheckpointError,
    load_module,
    read_json,
    read_pth,
    read_safetensors,
    require_file,
    safetensors_files,
    tensor_shape,
)
from wanfast.models.dit import WanDiT
from wanfast.models.vae import WanVAE
from wanfast.specs import ModelSpec, family_spec

if TYPE_CHECKING:
    from wanfast.models.text_encoder import TextEncoder

DIT_WEIGHTS = "diffusion_pytorch_model"
OFFICIAL_T5 = "models_t5_umt5-xxl-enc-bf16.pth"
OFFICIAL_VAES = ("Wan2.1_VAE.pth", "Wan2.2_VAE.pth")
OFFICIAL_TOKENIZER = "google/umt5-xxl"
FP8_MARKER = "wanfast_quantization"  # config.json key of an FP8 expert written by `wanfast quantize`


@dataclass(frozen=True)
class CheckpointPaths:
    """Where each component of a checkpoint lives. ``experts`` maps the spec's expert names (in order)
    to their folders."""

    kind: str  # "official" | "diffusers"
    experts: dict[str, Path]
    text_encoder: Path
    tokenizer: Path
    vae: Path
    boundary: float | None = None  # Diffusers' model_index.json boundary_ratio, when it records one

    @property
    def first_expert(self) -> Path:
        return next(iter(self.experts.values()))


def _find_paths(root: Path) -> CheckpointPaths:
    """The layout's paths, with every component checked present (no weights read)."""
    if (root / "model_index.json").is_file():
        index = read_json(root / "model_index.json", "Diffusers model index")
        for sub in ("transformer", "text_encoder", "tokenizer", "vae"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"Diffusers layout: folder {sub}/ missing in {root}")
        two = (root / "transformer_2").is_dir() or index.get("transformer_2", [None])[0] is not None
        if two and not (root / "transformer_2").is_dir():
            raise FileNotFoundError(f"Diffusers layout: folder transformer_2/ missing in {root}")
        experts = (
            {"high_noise": root / "transformer", "low_noise": root / "transformer_2"}
            if two
            else {"dit": root / "transformer"}
        )
        return CheckpointPaths(
            "diffusers", experts, root / "text_encoder", root / "tokenizer", root / "vae",
            index.get("boundary_ratio"),
        )  # fmt: skip
    two = (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir()
    if two or (root / "config.json").is_file():
        subs = ("high_noise_model", "low_noise_model") if two else ()
        for sub in (*subs, OFFICIAL_TOKENIZER):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"official layout: folder {sub}/ missing in {root}")
        require_file(root / OFFICIAL_T5, "official layout: T5 checkpoint")
        vaes = [root / v for v in OFFICIAL_VAES if (root / v).is_file()]
        if len(vaes) != 1:
            what = "none" if not vaes else "both"
            raise FileNotFoundError(f"official layout: one VAE checkpoint ({' or '.join(OFFICIAL_VAES)}) "
                                    f"expected in {root}, found {what}")  # fmt: skip
        experts = {"high_noise": root / subs[0], "low_noise": root / subs[1]} if two else {"dit": root}
        return CheckpointPaths("official", experts, root / OFFICIAL_T5, root / OFFICIAL_TOKENIZER, vaes[0])
    raise CheckpointError(
        f"{root} is neither an official Wan2.2 layout (high_noise_model/ + low_noise_model/, or config.json "
        f"+ weights; {OFFICIAL_T5}; a Wan VAE .pth) nor the Diffusers layout (model_index.json, transformer/, ...)"
    )


def vae_config(path: str | os.PathLike):
    """The VAE's config (``VAEConfig`` or ``VAE22Config``) from its Diffusers config.json or, for a
    ``.pth``, its tensor shapes (memory-mapped: no weights read)."""
    from wanfast.loading import vae22_keys

    p = Path(path)
    if p.is_dir():
        d = read_json(p / "config.json", "VAE config")
        if vae22_keys.is_wan22_diffusers_config(d):
            return vae22_keys.config_from_diffusers_json(d)
        return vae_keys.config_from_diffusers_json(d)
    sd = read_pth(p, "VAE checkpoint")
    if vae22_keys.is_wan22_state_dict(sd):
        return vae22_keys.config_from_state_dict(sd)
    return vae_keys.config_from_state_dict(sd)


def dit_config(path: str | os.PathLike) -> tuple[DiTConfig, str]:
    """Architecture and layout ("official" | "diffusers") of one DiT folder, from its config.json and,
    for what the official config does not record (the text width), from the tensor shapes."""
    cfg = read_json(Path(path) / "config.json", "transformer config")
    if "num_attention_heads" in cfg or cfg.get("_class_name") == "WanTransformer3DModel":
        return dit_keys.config_from_diffusers_json(cfg), "diffusers"
    if "dim" in cfg and "num_heads" in cfg:
        parsed = dit_keys.config_from_official_json(cfg)
        if "text_dim" not in cfg:  # official configs omit it: text_embedding.0.weight is [dim, text_dim]
            shape = tensor_shape(safetensors_files(path, DIT_WEIGHTS), "text_embedding.0.weight")
            if shape is not None and len(shape) == 2:
                parsed = replace(parsed, text_dim=int(shape[1]))
        return parsed, "official"
    raise CheckpointError(f"{path}/config.json is neither an official WanModel nor a Diffusers config")


def model_type(path: str | os.PathLike) -> str | None:
    """The official config.json's ``model_type`` ("t2v", "i2v", "ti2v"), if it records one."""
    return read_json(Path(path) / "config.json", "transformer config").get("model_type")


def is_fp8_checkpoint(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and FP8_MARKER in read_json(cfg, "transformer config")


def detect(ckpt_dir: str | os.PathLike) -> tuple[ModelSpec, CheckpointPaths]:
    """(spec, paths) of a checkpoint folder, from config files and tensor headers only (module doc)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {root}")
    paths = _find_paths(root)
    dits = [dit_config(p)[0] for p in paths.experts.values()]
    if len(dits) == 2 and dits[0] != dits[1]:
        raise CheckpointError(f"{root}: the two experts have different architectures ({dits[0]} / {dits[1]})")
    vae = vae_config(paths.vae)
    spec = family_spec(dits[0], vae, len(dits), model_type(paths.first_expert), where=str(root))
    if paths.boundary is not None and spec.two_experts:
        spec = replace(spec, defaults=replace(spec.defaults, boundary=float(paths.boundary)))
    return spec, paths


def load_transformer(
    path: str | os.PathLike, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16
) -> WanDiT:
    """One DiT from an official expert folder or a Diffusers ``transformer*/`` folder (bf16/fp32 weights;
    an FP8 folder from ``wanfast quantize`` loads through ``wanfast.accel.fp8_checkpoint``)."""
    if is_fp8_checkpoint(path):
        raise ConfigError(f"{path} is an FP8 checkpoint: load it with wanfast.load_pipeline (or the builder)")
    cfg, kind = dit_config(path)
    sd = read_safetensors(safetensors_files(path, DIT_WEIGHTS), device)
    if kind == "diffusers":
        sd = dit_keys.diffusers_to_official(sd)
    # The modulation tables are consumed in fp32 (as the official autocast regions do): keep them fp32.
    return load_module(
        lambda: WanDiT(cfg), sd, device, dtype, f"transformer {path}", keep_fp32=lambda n: n.endswith("modulation")
    )  # fmt: skip


def load_vae(
    path: str | os.PathLike, device: str | torch.device = "cuda", dtype: torch.dtype = torch.float32
):
    """The VAE a file or folder holds: the Wan2.1 VAE (``WanVAE``) or the Wan2.2 VAE (``Wan22VAE``), from
    a ``.pth`` (or a folder holding one) or a Diffusers ``vae/`` folder; which one from its contents."""
    from wanfast.loading import vae22_keys
    from wanfast.models.vae22 import Wan22VAE

    p = Path(path)
    if p.is_dir():
        held = [p / v for v in OFFICIAL_VAES if (p / v).is_file()]
        p = held[0] if len(held) == 1 else p
    if p.is_dir():
        d = read_json(p / "config.json", "VAE config")
        raw = read_safetensors(safetensors_files(p, DIT_WEIGHTS))
        if vae22_keys.is_wan22_diffusers_config(d):
            cfg, sd, cls = (
                vae22_keys.config_from_diffusers_json(d),
                vae22_keys.diffusers_to_official(raw),
                Wan22VAE,
            )
        else:
            cfg, sd, cls = vae_keys.config_from_diffusers_json(d), vae_keys.diffusers_to_official(raw), WanVAE
    else:
        sd = read_pth(p, "VAE checkpoint")
        if vae22_keys.is_wan22_state_dict(sd):
            cfg, cls = vae22_keys.config_from_state_dict(sd), Wan22VAE
        else:
            cfg, cls = vae_keys.config_from_state_dict(sd), WanVAE
    return load_module(lambda: cls(cfg), sd, device, dtype, f"VAE {p}")


def load_text_encoder(
    path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    text_len: int = 512,
) -> TextEncoder:
    """UMT5 encoder from the official ``.pth`` or a Diffusers ``text_encoder/`` folder, plus its tokenizer.
    Prompts are cut at ``text_len`` tokens (the DiT's context length, 512 for Wan2.2)."""
    # Imported here, not at the top: transformers is seconds of imports, which the builder's loader
    # thread then pays beside the experts' weight reads instead of before them.
    from wanfast.loading.text_encoder import load_diffusers_text_encoder, load_official_text_encoder

    p = Path(path)
    if not Path(tokenizer_path).is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {tokenizer_path}")
    if p.is_dir():
        return load_diffusers_text_encoder(p, tokenizer_path, device, dtype, text_len=text_len)
    return load_official_text_encoder(p, tokenizer_path, device, dtype, text_len=text_len)
