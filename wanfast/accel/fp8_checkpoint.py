"""FP8 DiT checkpoints, as ``wanfast quantize`` writes them: save and load.

An FP8 expert folder is an official expert folder (``config.json`` + ``diffusion_pytorch_model*``
safetensors, official key names, unfused q/k/v) whose ``config.json`` also holds the marker
``"wanfast_quantization": {"method": "fp8_e4m3", ...}``. For each quantised Linear ``X``:
``X.weight`` float8_e4m3fn [out, in], ``X.scale`` float32 [out] (``weight ~= X.weight * X.scale[:, None]``),
``X.bias`` as usual; every other tensor is as in a bf16 checkpoint.

Loading builds the DiT with fused projections directly (``accel.fuse``'s module layout): the q/k/v (and
cross k/v) tensors are concatenated row-wise before assignment, which for per-output-channel FP8 is
exactly what quantising the fused weight gives. So the loaded model equals ``fuse_projections`` then
``quantize_dit_`` of the bf16 one, and ``optimize_dit``'s fusion finds nothing left to do (fusing FP8
modules after the fact is not supported: ``concat_linears`` needs real weights).
"""

from __future__ import annotations

import os

import torch

from wanfast.accel.fp8 import FP8, FP8Linear, Policy
from wanfast.accel.fuse import fuse_projections
from wanfast.loading.checkpoint import (
    CheckpointError,
    check_state_dict,
    read_safetensors,
    safetensors_files,
)
from wanfast.loading.layout import FP8_MARKER, dit_config, is_fp8_checkpoint

__all__ = ["MARKER", "fp8_state_dict", "is_fp8_checkpoint", "load_fp8_transformer", "marker"]
from wanfast.models.dit import WanDiT

MARKER = FP8_MARKER
DIT_WEIGHTS = "diffusion_pytorch_model"
# Fused module -> the official Linears it concatenates, in order (see accel/fuse.py).
_FUSED = {"self_attn.wqkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
          "cross_attn.wkv": ("cross_attn.k", "cross_attn.v")}  # fmt: skip


def marker(policy: Policy, compute_dtype: torch.dtype) -> dict:
    """The ``config.json`` entry that marks an expert folder as FP8."""
    return {"method": "fp8_e4m3", "activations": "per-row dynamic scale", "weights": "per-output-channel scale",
            "policy": policy.to_json(), "compute_dtype": str(compute_dtype).removeprefix("torch.")}  # fmt: skip


def fp8_state_dict(dit: WanDiT) -> dict[str, torch.Tensor]:
    """The checkpoint keys of a (possibly partly) FP8 DiT: an FP8Linear's ``qweight`` is saved as ``weight``.
    The DiT must be unfused (official key names)."""
    if any(name.endswith(tuple(_FUSED)) for name, _ in dit.named_modules()):
        raise ValueError("save an unfused DiT: FP8 checkpoints hold the official q/k/v key names")
    return {(k[: -len("qweight")] + "weight" if k.endswith(".qweight") else k): v.contiguous()
            for k, v in dit.state_dict().items()}  # fmt: skip


def _fuse_keys(sd: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Official q/k/v keys -> fused wqkv / wkv keys, concatenating weight, scale and bias row-wise."""
    sd = dict(sd)
    for i in range(num_layers):
        for fused, parts in _FUSED.items():
            for suffix in ("weight", "scale", "bias"):
                keys = [f"blocks.{i}.{p}.{suffix}" for p in parts]
                present = [k in sd for k in keys]
                if not any(present):
                    continue
                if not all(present) or len({sd[k].dtype for k in keys}) > 1:
                    raise CheckpointError(f"block {i}: {fused} parts are not quantised alike ({suffix})")
                sd[f"blocks.{i}.{fused}.{suffix}"] = torch.cat([sd.pop(k) for k in keys])
    return sd


def load_fp8_transformer(
    path: str | os.PathLike, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16
) -> WanDiT:
    """An FP8 expert folder -> a fused WanDiT whose quantised Linears are ``FP8Linear`` on ``device``."""
    cfg = dit_config(path)[0]  # config.json, and the text width from the tensor shapes
    sd = _fuse_keys(read_safetensors(safetensors_files(path, DIT_WEIGHTS), device), cfg.num_layers)
    quantized = [k[: -len(".scale")] for k in sd if k.endswith(".scale")]
    with torch.device("meta"):
        dit = WanDiT(cfg)
        fuse_projections(dit)
        for name in quantized:
            parent_name, _, child = name.rpartition(".")
            parent, lin = dit.get_submodule(parent_name), dit.get_submodule(name)
            setattr(parent, child, FP8Linear(lin.in_features, lin.out_features, lin.bias is not None, dtype))
    for name in quantized:  # on disk "weight", in the module "qweight"
        if sd[f"{name}.weight"].dtype != FP8:
            raise CheckpointError(f"{path}: {name}.weight has a scale but is {sd[f'{name}.weight'].dtype}")
        sd[f"{name}.qweight"] = sd.pop(f"{name}.weight")
    ref = dit.state_dict()
    check_state_dict(ref, sd, f"FP8 checkpoint {path}")
    converted = {}
    for name, t in sd.items():
        keep = t.dtype == FP8 or name.endswith((".scale", "modulation")) or not t.is_floating_point()
        target = (torch.float32 if name.endswith("modulation") else t.dtype) if keep else dtype
        converted[name] = t.to(device=device, dtype=target)
    dit.load_state_dict(converted, strict=True, assign=True)
    for m in dit.modules():  # the non-persistent dtype marker, and the GEMM path for the real device
        if isinstance(m, FP8Linear):
            m.weight = torch.empty(0, dtype=dtype, device=device)
            m.to(device)  # re-runs FP8Linear._apply: decides use_scaled_mm for ``device``
    return dit.eval().requires_grad_(False)
