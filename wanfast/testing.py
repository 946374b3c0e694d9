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

from wanfast.config import DiTConfig, ModelPreset
from wanfast.loading import dit_keys, vae_keys
from wanfast.models.dit import WanDiT
from wanfast.models.vae import WanVAE
from wanfast.testing_text import write_diffusers_t5, write_official_t5, write_tiny_tokenizer

# Seed offsets per component, so experts differ from each other and from the VAE.
_SEEDS = {"high_noise": 1, "low_noise": 2, "text_encoder": 3, "vae": 4}


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


def vae_state_dict(preset: ModelPreset, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return _randomized(WanVAE(preset.vae), seed)


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


def write_official_checkpoint(
    folder: str | os.PathLike, preset: ModelPreset, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """The official Wan2.2-T2V-A14B folder layout with random weights at ``preset``'s dimensions."""
    root = Path(folder)
    for expert in ("high_noise", "low_noise"):
        sub = root / f"{expert}_model"
        write_sharded_safetensors(
            dit_state_dict(preset.dit, seed * 10 + _SEEDS[expert]), sub, "diffusion_pytorch_model", 2, dtype
        )
        (sub / "config.json").write_text(json.dumps(dit_keys.official_config_json(preset.dit), indent=2))
    write_official_t5(root / "models_t5_umt5-xxl-enc-bf16.pth", preset.text_encoder, seed * 10 + 3, dtype)
    write_tiny_tokenizer(root / "google" / "umt5-xxl", preset.text_encoder.vocab_size)
    torch.save(vae_state_dict(preset, seed * 10 + _SEEDS["vae"]), root / "Wan2.1_VAE.pth")
    return root


def write_diffusers_checkpoint(
    folder: str | os.PathLike, preset: ModelPreset, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """The Diffusers Wan2.2 folder layout, holding the same weights as ``write_official_checkpoint``."""
    root = Path(folder)
    for expert, sub in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        sd = dit_keys.official_to_diffusers(dit_state_dict(preset.dit, seed * 10 + _SEEDS[expert]))
        write_sharded_safetensors(sd, root / sub, "diffusion_pytorch_model", 2, dtype)
        (root / sub / "config.json").write_text(
            json.dumps(dit_keys.diffusers_config_json(preset.dit), indent=2)
        )
    write_diffusers_t5(root / "text_encoder", preset.text_encoder, seed * 10 + 3, dtype)
    write_tiny_tokenizer(root / "tokenizer", preset.text_encoder.vocab_size)
    vae_sd = vae_keys.official_to_diffusers(vae_state_dict(preset, seed * 10 + _SEEDS["vae"]))
    write_sharded_safetensors(vae_sd, root / "vae", "diffusion_pytorch_model", 1, dtype)
    (root / "vae" / "config.json").write_text(
        json.dumps(vae_keys.diffusers_config_json(preset.vae), indent=2)
    )
    (root / "scheduler").mkdir(exist_ok=True)
    scheduler = {
        "_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "prediction_type": "flow_prediction",
        "use_flow_sigmas": True, "flow_shift": preset.defaults.shift, "solver_order": 2,
    }  # fmt: skip
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {
        "_class_name": "WanPipeline",
        "boundary_ratio": preset.defaults.boundary,
        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
