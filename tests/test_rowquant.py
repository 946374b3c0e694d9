"""The one-pass FP8 row-quantisation kernel (kernels/rowquant.py) and ``accel.fp8.use_row_kernels``, on CPU.

The Triton kernel runs in Triton's CPU interpreter (a subprocess: TRITON_INTERPRET must be set before
triton is imported) and is compiled for sm_90 to check the e4m3 cast the GPU uses. ``optimize_dit`` with
the row kernels equals it without them on CPU (the custom op runs the torch reference there).
"""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import replace

import pytest
import torch
from helpers import run_in_triton_interpreter
from test_fp8 import CPU, dit_inputs, tiny_dit
from torch import nn

from wanfast.accel import optimize_dit
from wanfast.accel.fp8 import FP8Linear, fp8_modules, quantize_rows
from wanfast.kernels.rowquant import rowquant, rowquant_reference


def test_reference_is_quantize_rows_of_the_gelu_output():
    x = (torch.randn(7, 300, generator=torch.Generator().manual_seed(0)) * 3).bfloat16()
    for gelu in (False, True):
        y, s = rowquant_reference(x, gelu)
        ry, rs = quantize_rows(nn.GELU(approximate="tanh")(x) if gelu else x)
        assert torch.equal(y.float(), ry.float()) and torch.equal(s, rs)
    assert rowquant_reference(torch.zeros(2, 16))[0].float().abs().max() == 0  # no 0/0


def test_custom_op_registration_and_cpu_path():
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    torch.library.opcheck(rowquant, (x, True))  # fake (meta) impl, schema, autograd registration
    y, s = rowquant(x[:, ::2], True)  # non-contiguous rows are made contiguous
    ry, rs = rowquant_reference(x[:, ::2], True)
    assert y.shape == (5, 32) and torch.equal(y.float(), ry.float()) and torch.equal(s, rs)


_INTERPRETED = textwrap.dedent("""
    import torch
    from wanfast.kernels.rowquant import rowquant_interpreted, rowquant_reference

    g = torch.Generator().manual_seed(0)
    # K not a power of two; K < 512: several rows per program, with a tail of rows; an all-zero row
    for r, k, gelu, dtype in [(37, 100, False, torch.bfloat16), (5, 300, True, torch.bfloat16),
                              (3, 5000, True, torch.bfloat16), (4, 64, True, torch.float32)]:
        x = (torch.randn(r, k, generator=g) * 3).to(dtype)
        x[1] = 0
        (y, s), (ry, rs) = rowquant_interpreted(x, gelu), rowquant_reference(x, gelu)
        yf, ryf = y.float(), ry.float()
        if not gelu:  # the same float32 ops in the same order: bit for bit
            assert torch.equal(yf, ryf) and torch.equal(s, rs), (r, k)
        else:  # GELU as x * sigmoid(2u) vs torch's tanh form: one bf16 ulp apart now and then
            assert torch.allclose(s, rs, rtol=1e-2, atol=0), (r, k)
            step = torch.exp2(torch.floor(torch.log2(ryf.abs().clamp(min=2**-6))) - 3)  # one e4m3 step
            assert ((yf - ryf).abs() <= step * 1.001).all(), (r, k)
            assert (yf != ryf).float().mean() < 0.1, (r, k, (yf != ryf).float().mean())
        assert y.dtype == torch.float8_e4m3fn and s.shape == (r, 1) and yf[1].abs().max() == 0
    print("ok")
""")


def test_triton_kernel_in_the_cpu_interpreter_matches_the_reference():
    assert "ok" in run_in_triton_interpreter(_INTERPRETED)


@pytest.mark.parametrize("gelu", [False, True])
def test_kernel_compiles_for_hopper_with_a_round_to_nearest_e4m3_cast(gelu):
    """The interpreter cannot check the cast (its float32 -> e4m3 does not round to nearest); the sm_90
    code must use the hardware's round-to-nearest-even, saturating conversion, as torch's ``.to(e4m3)``."""
    triton = pytest.importorskip("triton", reason="the test extra installs triton on Linux x86-64")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from wanfast.kernels import rowquant as rq

    fn = rq._rowquant_kernel
    consts = dict(BLOCK_K=16384, ROWS=1, GELU=gelu)
    types = {"x_ptr": "*bf16", "y_ptr": "*fp8e4nv", "s_ptr": "*fp32"}
    sig = {
        p: "constexpr" if p in consts else types.get(p, "i32") for p in inspect.signature(fn.fn).parameters
    }
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 16})  # fmt: skip
    assert "cvt.rn.satfinite.e4m3x2.f32" in kernel.asm["ptx"]


def test_optimize_dit_row_kernels_equal_torch_ops_and_switch_off():
    x, t, ctx = dit_inputs()
    fp8 = replace(CPU, dtype=torch.bfloat16, quant="fp8")
    on = optimize_dit(tiny_dit(), fp8)
    off = optimize_dit(tiny_dit(), replace(fp8, fp8_row_kernels=False))
    kernels = {n: m.input_kernel for n, m in fp8_modules(on).items() if m.input_kernel}
    assert kernels == {f"blocks.{i}.{name}": kind for i in range(2)
                       for name, kind in (("ffn.2", "gelu_rows"), ("self_attn.o", "rows"), ("cross_attn.o", "rows"))}  # fmt: skip
    assert all(isinstance(b.ffn[1], nn.Identity) for b in on.blocks)  # the GELU moved into ffn.2's kernel
    assert not any(m.input_kernel for m in fp8_modules(off).values())
    assert all(isinstance(b.ffn[1], nn.GELU) for b in off.blocks)
    assert on.state_dict().keys() == off.state_dict().keys()  # checkpoint keys unchanged
    assert torch.equal(on(x, t, ctx), off(x, t, ctx))  # CPU: the op runs the same torch math
    assert not replace(fp8, fp8_row_kernels=True).plain().fp8_row_kernels
    # without FP8 linears nothing changes
    assert all(
        isinstance(b.ffn[1], nn.GELU) for b in optimize_dit(tiny_dit(), replace(fp8, quant=None)).blocks
    )


def test_row_kernels_trace_into_the_compiled_blocks():
    """Regional compile (fullgraph) traces through the custom op; same output as eager."""
    x, t, ctx = dit_inputs()
    fp8 = replace(CPU, dtype=torch.bfloat16, quant="fp8")
    eager = optimize_dit(tiny_dit(), fp8)
    compiled = optimize_dit(tiny_dit(), replace(fp8, compile=True), compile_backend="aot_eager")
    assert any(isinstance(m, FP8Linear) and m.input_kernel == "gelu_rows" for m in compiled.modules())
    assert torch.equal(compiled(x, t, ctx), eager(x, t, ctx))
