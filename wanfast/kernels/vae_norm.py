"""Fused RMSNorm + SiLU of the VAE decoder (``accel.vae``'s ``fused_norm``): SiLU(x / |x|_C * scale * gamma)
in one pass over [B, C, T, H, W], fp32 inside. Three implementations of the same math: eager torch (the
reference, and the CPU path), ``torch.compile`` of it, and a Triton kernel that reads channels-last or
channels-first activations and writes straight into a caller's (padded) buffer."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

try:  # only the "triton" implementation needs it, on CUDA
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def norm_silu_eager(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> torch.Tensor:
    """SiLU(x / max(|x|_C, 1e-12) * scale * gamma), fp32 inside, x.dtype out; x [B, C, ...]."""
    xf = x.float()
    inv = scale / torch.linalg.vector_norm(xf, dim=1, keepdim=True).clamp_min(1e-12)  # [B, 1, ...]
    return F.silu(xf * inv * gamma.float()).to(x.dtype)


def norm_silu_into(x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    out.copy_(norm_silu_eager(x, gamma, scale))


@functools.cache
def compiled_norm_silu_into():
    # dynamic=False: one graph per (shape, strides), ~15 in a decode (stages x first / later chunks); the
    # recompile limit is raised to 64 while decoding (_decode_flags).
    return torch.compile(norm_silu_into, dynamic=False)


if triton is not None:

    @triton.jit
    def _offsets(s, c, stride, CL: tl.constexpr):
        # [BLOCK_S, BLOCK_C] element offsets: channels contiguous (CL, stride = pixel stride) or pixels
        # contiguous (stride = channel stride, int64: C * T*H*W can pass 2**31). Known unit strides let
        # Triton vectorise the loads along the contiguous axis.
        if CL:
            return s[:, None] * stride + c[None, :]
        return s[:, None] + c[None, :].to(tl.int64) * stride

    @triton.jit
    def _rms_silu_kernel(x_ptr, g_ptr, y_ptr, C, S, sxb, sx, syb, sy, scale,
                         X_CL: tl.constexpr, Y_CL: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_S: tl.constexpr):  # fmt: skip
        # x, y viewed as [B, C, S] (S = T*H*W): one program normalises BLOCK_S pixels of batch item
        # program_id(1) over all C channels, in fp32.
        s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
        c = tl.arange(0, BLOCK_C)
        b = tl.program_id(1).to(tl.int64)
        mask = (s[:, None] < S) & (c[None, :] < C)
        x = tl.load(x_ptr + b * sxb + _offsets(s, c, sx, X_CL), mask=mask, other=0.0).to(tl.float32)
        inv = scale / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)  # [BLOCK_S]
        g = tl.load(g_ptr + c, mask=c < C, other=0.0).to(tl.float32)
        y = x * inv[:, None] * g[None, :]
        y = y * tl.sigmoid(y)
        tl.store(y_ptr + b * syb + _offsets(s, c, sy, Y_CL), y.to(y_ptr.dtype.element_ty), mask=mask)


def _bcs(t: torch.Tensor) -> tuple[torch.Tensor, bool, int] | None:
    """[B, C, T, H, W] -> ([B, C, S] view, channels contiguous?, stride of the other axis), or None when no
    such view exists (neither channels nor pixels at unit stride)."""
    try:
        v = t.view(*t.shape[:2], -1)
    except RuntimeError:
        return None
    if v.stride(1) == 1:
        return v, True, v.stride(2)
    if v.stride(2) == 1:
        return v, False, v.stride(1)
    return None


def norm_silu_triton(x: torch.Tensor, gamma: torch.Tensor, scale: float, out: torch.Tensor) -> None:
    xs = _bcs(x) or _bcs(x.contiguous())  # an odd view: make it dense first
    ys = _bcs(out)
    if ys is None:  # an output layout the kernel cannot address: write densely, then copy once
        dense = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        norm_silu_triton(x, gamma, scale, dense)
        out.copy_(dense)
        return
    (xv, x_cl, sx), (yv, y_cl, sy) = xs, ys
    b, c, s = xv.shape
    block_c = triton.next_power_of_2(c)  # 96 -> 128, 192 -> 256, 384 -> 512
    block_s = max(1, 4096 // block_c)  # a 4096-element tile per program
    grid = (triton.cdiv(s, block_s), b)
    _rms_silu_kernel[grid](xv, gamma, yv, c, s, xv.stride(0), sx, yv.stride(0), sy, scale,
                           X_CL=x_cl, Y_CL=y_cl, BLOCK_C=block_c, BLOCK_S=block_s, num_warps=4)  # fmt: skip
