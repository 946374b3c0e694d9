"""Random LoRA files at any model's dimensions, for tests and the switch benchmark (no published file needed:
the switch cost and its exactness depend on shapes and on the merge arithmetic, not on trained values)."""

from __future__ import annotations

import os

import torch

from wanfast.config import DiTConfig

# the Linears of one block, official names
BLOCK_LINEARS = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)  # fmt: skip


def random_lora_tensors(
    cfg: DiTConfig, rank: int, seed: int, dtype: torch.dtype = torch.bfloat16, extras: bool = False
) -> dict[str, torch.Tensor]:
    """A Kohya/ComfyUI-style state dict (``diffusion_model.<module>.lora_down/lora_up/alpha``) covering
    every block Linear of a DiT of ``cfg``: down [r, in] ~ N(0, 1/in), up [out, r] ~ N(0, 0.01/r), so the
    update is ~1% of a fan-in scaled weight, as trained LoRAs are. ``extras``: also LightX2V-style full
    deltas (``.diff_b`` on the q and v biases of self-attention and the k bias of cross-attention, rows of
    the fused projections; ``.diff_m`` on block 0's modulation; ``.diff`` on the head), to cover every
    kind of target."""
    g = torch.Generator().manual_seed(seed)
    out_dims = {"ffn.0": cfg.ffn_dim}
    in_dims = {"ffn.2": cfg.ffn_dim}
    sd = {}
    for i in range(cfg.num_layers):
        for name in BLOCK_LINEARS:
            key = f"diffusion_model.blocks.{i}.{name}"
            n_out, n_in = out_dims.get(name, cfg.dim), in_dims.get(name, cfg.dim)
            sd[f"{key}.lora_down.weight"] = (torch.randn(rank, n_in, generator=g) / n_in**0.5).to(dtype)
            sd[f"{key}.lora_up.weight"] = (torch.randn(n_out, rank, generator=g) * 0.1 / rank**0.5).to(dtype)
            sd[f"{key}.alpha"] = torch.tensor(float(rank) / 2)
    if extras:
        for name in (
            "blocks.0.self_attn.q",
            "blocks.0.self_attn.v",
            f"blocks.{cfg.num_layers - 1}.cross_attn.k",
        ):
            sd[f"diffusion_model.{name}.diff_b"] = 0.01 * torch.randn(cfg.dim, generator=g)
        sd["diffusion_model.blocks.0.diff_m"] = 0.01 * torch.randn(1, 6, cfg.dim, generator=g)
        head_out = cfg.out_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        sd["diffusion_model.head.head.diff"] = 0.01 * torch.randn(head_out, cfg.dim, generator=g)
    return sd


def write_random_lora(path: str | os.PathLike, cfg: DiTConfig, rank: int, seed: int, **kw) -> str:
    """``random_lora_tensors`` saved as a ``.safetensors`` file; returns its path."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in random_lora_tensors(cfg, rank, seed, **kw).items()}, str(path))
    return str(path)
