"""Row-wise FP8 quantisation of an FP8 linear's input in one pass, optionally behind GELU-tanh (Triton).

    x [R, K] bf16 -> x8 [R, K] float8_e4m3fn, scale [R, 1] float32, x ~= x8 * scale per row

What ``quantize_rows`` (below; ``accel.fp8`` uses it) computes, as one kernel: each program holds whole
rows in registers, so x is read from memory once (amax and the scaled cast reuse the registers). Inductor's
fusion of the same torch ops (a looped row reduction, then a second loop that recomputes and writes) ran
the FFN's GELU + quantisation over [75,600, 13,824] at 3.7 ms per block on an H200 (benchmarks/profile_forward.py,
2026-11-23), about 4x the time one read and one write take at the copy bandwidth; this kernel: 1.50 ms
vs inductor's 3.42 in the same run (``benchmarks/rowquant_gpu.py``, BENCHMARKS.md "Run 3").

``gelu=True`` applies GELU-tanh first, rounded to the input dtype as ``nn.GELU`` on a bf16 tensor would
be, so the kernel stands in for ``GELU -> quantize_rows`` of the FFN: ``ffn.0``'s bf16 output goes in,
``ffn.2``'s FP8 operand comes out. GELU-tanh(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u),
u = sqrt(2/pi) (x + 0.044715 x^3).

``rowquant`` is a torch custom op (opaque to torch.compile; the compiled block calls the kernel), with a
torch reference ``rowquant_reference`` for CPU runs and tests; the Triton kernel also runs in Triton's CPU
interpreter (``TRITON_INTERPRET=1``), which the tests use to check it against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # the kernel needs Triton (CUDA, or its CPU interpreter in tests); the reference does not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn value
_EPS = 1e-12  # amax floor: an all-zero row quantises to zeros instead of 0/0


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [R, K] -> (x8 [R, K] float8_e4m3fn, scale [R, 1] float32) with x ~= x8 * scale (round to nearest).
    The torch ops ``accel.fp8`` uses (compile fuses them into what produced x) and the kernel's reference."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS) / E4M3_MAX
    return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), scale


def rowquant_reference(x: Tensor, gelu: bool = False) -> tuple[Tensor, Tensor]:
    """Torch ops of the kernel's math: x [R, K] -> (x8 [R, K] e4m3, scale [R, 1] float32)."""
    if gelu:
        x = F.gelu(x, approximate="tanh")  # computed in float32, rounded to x's dtype, as nn.GELU
    return quantize_rows(x)


if triton is not None:

    @triton.jit
    def _rowquant_kernel(x_ptr, y_ptr, s_ptr, R, K, stride_x, stride_y,
                         BLOCK_K: tl.constexpr, ROWS: tl.constexpr, GELU: tl.constexpr):  # fmt: skip
        # ROWS rows per program, each whole in registers: [ROWS, BLOCK_K] with BLOCK_K >= K
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < R) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        xf = x.to(tl.float32)
        if GELU:
            u = 0.7978845608028654 * (xf + 0.044715 * xf * xf * xf)  # sqrt(2/pi) (x + 0.044715 x^3)
            xf = (xf / (1.0 + tl.exp(-2.0 * u))).to(x.dtype).to(tl.float32)  # x sigmoid(2u), rounded
        amax = tl.max(tl.abs(xf), axis=1)  # [ROWS]; masked columns are 0 (GELU(0) = 0)
        scale = tl.maximum(amax, 1e-12) / 448.0
        y = tl.clamp(xf / scale[:, None], -448.0, 448.0)
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows, scale, mask=rows < R)


def _launch(x: Tensor, gelu: bool, out_dtype: torch.dtype = FP8) -> tuple[Tensor, Tensor]:
    R, K = x.shape
    y = torch.empty(R, K, dtype=out_dtype, device=x.device)
    s = torch.empty(R, 1, dtype=torch.float32, device=x.device)
    block_k = triton.next_power_of_2(K)
    # ~32 fp32 values per thread: one row of 16,384 with 16 warps, or several short rows per program
    rows = max(1, min(16, 8192 // block_k))
    warps = max(1, min(16, rows * block_k // (32 * 32)))
    _rowquant_kernel[(triton.cdiv(R, rows),)](x, y, s, R, K, x.stride(0), y.stride(0),
                                              BLOCK_K=block_k, ROWS=rows, GELU=gelu, num_warps=warps)  # fmt: skip
    return y, s


@torch.library.custom_op("wanfast::rowquant", mutates_args=())
def rowquant(x: Tensor, gelu: bool = False) -> tuple[Tensor, Tensor]:
    """x [R, K] (rows contiguous) -> (x8 [R, K] e4m3, scale [R, 1] float32); ``gelu``: GELU-tanh first.
    The Triton kernel on CUDA; the torch reference elsewhere."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.is_cuda and triton is not None:
        return _launch(x, gelu)
    return rowquant_reference(x, gelu)


@rowquant.register_fake
def _(x: Tensor, gelu: bool = False) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=FP8), x.new_empty(x.shape[0], 1, dtype=torch.float32)


def rowquant_interpreted(x: Tensor, gelu: bool = False) -> tuple[Tensor, Tensor]:
    """The Triton kernel on CPU tensors, for tests under ``TRITON_INTERPRET=1`` (set before importing
    triton). The kernel writes the scaled values in float32 and torch casts them to e4m3: the interpreter's
    own float32 -> e4m3 cast does not round to nearest even (124.3 -> 64 in Triton 3.6), unlike the GPU's
    ``cvt.rn.satfinite`` that compiled kernels use."""
    y, s = _launch(x.contiguous(), gelu, torch.float32)
    return y.to(FP8), s
