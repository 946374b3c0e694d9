"""Random-weight checkpoints written in the official and the Diffusers layouts.

Used by the tests and by ``--model tiny``: the same seed gives the same weights in both layouts, so the
two loading paths can be compared exactly. Real file formats throughout (sharded safetensors with an
index, torch .pth files, config.json as the public checkpoints have them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from wanfast.config import DiTConfig
from wanfast.loading import dit_keys, vae_keys
from wanfast.models.dit import WanDiT
from wanfast.models.vae import WanVAE
from wanfast.specs import ModelSpec
from wanfast.tools.testing_text import write_diffusers_t5, write_official_t5, write_tiny_tokenizer

# Seed offsets per component, so experts differ from each other and from the VAE.
_SEEDS = {"high_noise": 1, "low_noise": 2, "text_encoder": 3, "vae": 4, "dit": 1}


def _randomized(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Default init, then every 1-D weight (norm scales) jittered around 1 so no parameter is trivial."""
    torch.manual_seed(seed)
    module = module.float()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if (p.dim() == 1 and name.endswith("weight")) or name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def dit_state_dict(cfg: DiTConfig, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return _randomized(WanDiT(cfg), seed)


def vae_state_dict(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return _randomized(WanVAE(spec.vae), seed)


def write_sharded_safetensors(
    sd: dict[str, torch.Tensor], folder: str | os.PathLike, stem: str, shards: int, dtype: torch.dtype
) -> None:
    """``{stem}-0000k-of-0000n.safetensors`` + ``{stem}.safetensors.index.json`` (or one file if shards=1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    if shards == 1:
        save_file(sd, str(folder / f"{stem}.safetensors"))
        return
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


MODEL_TYPES = {"text": "t2v", "first_frame": "ti2v", "concat": "i2v"}  # official config.json model_type
_OFFICIAL_DIRS = {"high_noise": "high_noise_model", "low_noise": "low_noise_model", "dit": ""}
_DIFFUSERS_DIRS = {"high_noise": "transformer", "low_noise": "transformer_2", "dit": "transformer"}


def _model_type(spec: ModelSpec) -> str:
    return "t2v" if spec.conditioning == "text" and spec.two_experts else MODEL_TYPES[spec.conditioning]


def _vae(spec: ModelSpec, seed: int) -> tuple[str, dict[str, torch.Tensor], dict]:
    """(official file name, official state dict, Diffusers config) of the spec's VAE, random weights."""
    if getattr(spec.vae, "kind", "wan2.1") == "wan2.2":
        from wanfast.loading import vae22_keys

        sd = vae22_keys.wan22_vae_state_dict(spec.vae, seed)
        return "Wan2.2_VAE.pth", sd, vae22_keys.diffusers_config_json(spec.vae)
    return "Wan2.1_VAE.pth", vae_state_dict(spec, seed), vae_keys.diffusers_config_json(spec.vae)


def _vae_to_diffusers(spec: ModelSpec, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if getattr(spec.vae, "kind", "wan2.1") == "wan2.2":
        from wanfast.loading import vae22_keys

        return vae22_keys.official_to_diffusers(sd)
    return vae_keys.official_to_diffusers(sd)


def write_official_checkpoint(
    folder: str | os.PathLike, spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """The official folder layout of ``spec``'s model (two expert folders, or one DiT at the root; the
    Wan2.1 or Wan2.2 VAE file) with random weights at its dimensions."""
    root = Path(folder)
    for expert in spec.experts:
        sub = root / _OFFICIAL_DIRS[expert]
        sd = dit_state_dict(spec.dit, seed * 10 + _SEEDS[expert])
        write_sharded_safetensors(sd, sub, "diffusion_pytorch_model", 2, dtype)
        config = dit_keys.official_config_json(spec.dit, _model_type(spec))
        (sub / "config.json").write_text(json.dumps(config, indent=2))
    write_official_t5(root / "models_t5_umt5-xxl-enc-bf16.pth", spec.text_encoder, seed * 10 + 3, dtype)
    write_tiny_tokenizer(root / "google" / "umt5-xxl", spec.text_encoder.vocab_size)
    name, vae_sd, _ = _vae(spec, seed * 10 + _SEEDS["vae"])
    torch.save(vae_sd, root / name)
    return root


def write_diffusers_checkpoint(
    folder: str | os.PathLike, spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """The Diffusers folder layout of ``spec``'s model, holding the same weights as
    ``write_official_checkpoint``."""
    root = Path(folder)
    for expert in spec.experts:
        sub = _DIFFUSERS_DIRS[expert]
        sd = dit_keys.official_to_diffusers(dit_state_dict(spec.dit, seed * 10 + _SEEDS[expert]))
        write_sharded_safetensors(sd, root / sub, "diffusion_pytorch_model", 2, dtype)
        (root / sub / "config.json").write_text(
            json.dumps(dit_keys.diffusers_config_json(spec.dit), indent=2)
        )
    write_diffusers_t5(root / "text_encoder", spec.text_encoder, seed * 10 + 3, dtype)
    write_tiny_tokenizer(root / "tokenizer", spec.text_encoder.vocab_size)
    _, vae_sd, vae_config = _vae(spec, seed * 10 + _SEEDS["vae"])
    write_sharded_safetensors(
        _vae_to_diffusers(spec, vae_sd), root / "vae", "diffusion_pytorch_model", 1, dtype
    )
    (root / "vae" / "config.json").write_text(json.dumps(vae_config, indent=2))
    (root / "scheduler").mkdir(exist_ok=True)
    scheduler = {
        "_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "prediction_type": "flow_prediction",
        "use_flow_sigmas": True, "flow_shift": spec.defaults.shift, "solver_order": 2,
    }  # fmt: skip
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "WanImageToVideoPipeline" if spec.conditioning == "concat" else "WanPipeline",
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"] if spec.two_experts else [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    if spec.two_experts:
        index["boundary_ratio"] = spec.defaults.boundary
    if spec.conditioning == "first_frame":
        index["expand_timesteps"] = True  # Diffusers' Wan2.2 TI2V: per-token timesteps
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
