"""FP8 self-attention through FlashAttention-3's e4m3 forward kernel (Hopper), with K smoothing (lossy).

FA3 builds with FP8 forward kernels (the ``fa3-fwd`` wheel has them: ``FLASHATTENTION_DISABLE_FP8`` off,
head dims 64-256): Q/K/V in e4m3 with one float32 descale per (batch, head), P cast to e4m3 inside the
kernel, fp32 accumulation, bf16 out. Hopper's FP8 wgmma runs at twice the bf16 rate, and FA3 overlaps
the softmax with the GEMMs (warp-specialised, ping-pong) — what a Triton kernel does not do here (see
``kernels/attn8.py`` and BENCHMARKS.md: 598 vs 668 TFLOP/s for bf16 FA3).

Quantisation (this module, in torch ops, so the regional ``torch.compile`` of the block fuses it into the
RoPE/projection epilogue instead of adding passes over q, k, v):
- K smoothing: subtract the per-(batch, head) mean of K over tokens. softmax_j(q . (k_j - m)) =
  softmax_j(q . k_j) for every query (q . m is constant along the softmax axis), so the result is unchanged
  in exact arithmetic while K's range, and so its e4m3 rounding, shrinks (keys share a large common
  component in DiTs);
- per (batch, head) scales s = amax(|x|) / 448 over tokens and channels; x8 = e4m3(x / s); FA3 gets the
  descales s and computes softmax((q8 k8^T) sq sk / sqrt(D)) (v8 sv).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
_KERNEL: dict[str, object] = {}  # "fn": FA3's flash_attn_func (tests put a CPU stand-in here)


def quantize_heads(x: Tensor, smooth: bool = False) -> tuple[Tensor, Tensor]:
    """x [B, L, H, D] -> (x8 [B, L, H, D] e4m3, descale [B, H] float32). ``smooth``: subtract the
    per-(batch, head) token mean first (keys only: queries and values must keep their values)."""
    xf = x.float()
    if smooth:
        xf = xf - xf.mean(dim=1, keepdim=True)
    scale = xf.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX  # [B, H]
    x8 = (xf / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return x8, scale.contiguous()


def dequantize_heads(x8: Tensor, scale: Tensor) -> Tensor:
    """What ``quantize_heads`` stands for, float32 [B, L, H, D]."""
    return x8.float() * scale[:, None, :, None]


def fp8_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The inputs' quantisation error alone: exact float32 softmax attention of the dequantised q, smoothed
    k and v (FA3 also rounds P to e4m3 inside the kernel; the GPU benchmark measures the total)."""
    q_, k_, v_ = (dequantize_heads(*quantize_heads(x, smooth=x is k)) for x in (q, k, v))
    w = torch.einsum("bqhd,bkhd->bhqk", q_, k_) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), v_).to(q.dtype)


@torch.library.custom_op("wanfast::fa3_fp8", mutates_args=())
def _fa3_fp8(q8: Tensor, k8: Tensor, v8: Tensor, q_scale: Tensor, k_scale: Tensor, v_scale: Tensor) -> Tensor:
    # e4m3 [B, L, H, D] x 3, descales [B, H] float32 -> [B, L, H, D] bf16
    out = _KERNEL["fn"](q8, k8, v8, q_descale=q_scale, k_descale=k_scale, v_descale=v_scale)
    return (out[0] if isinstance(out, tuple) else out).contiguous()


@_fa3_fp8.register_fake
def _(q8: Tensor, k8: Tensor, v8: Tensor, q_scale: Tensor, k_scale: Tensor, v_scale: Tensor) -> Tensor:
    return q8.new_empty(*q8.shape[:-1], v8.shape[-1], dtype=torch.bfloat16)


def fa3_fp8_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v [B, L, H, D] (bf16) -> [B, L, H, D] in q's dtype, scale 1/sqrt(D)."""
    q8, sq = quantize_heads(q)
    k8, sk = quantize_heads(k, smooth=True)
    v8, sv = quantize_heads(v)
    return _fa3_fp8(q8, k8, v8, sq, sk, sv).to(q.dtype)


def load(flash_attn_func: Callable) -> Callable:
    """Bind FA3's ``flash_attn_func`` (``wanfast.attention`` finds it, as for the bf16 ``flash3``
    backend); returns the backend function."""
    _KERNEL["fn"] = flash_attn_func
    return fa3_fp8_attention
