"""FA3-FP8 self-attention (wanfast/kernels/fp8_attention.py) on the CPU: the quantisation math against exact
attention (bounds measured first: relative error 0.045 with or without a common K offset; 0.22 / 0.87 at
offsets 8 / 30 without smoothing), the plumbing of the descales into the kernel call (a CPU stand-in for
FA3's e4m3 kernel), tracing under torch.compile, and the registry entry. The FA3 kernel itself runs on
Hopper only: benchmarks/attn8_gpu.py times it and measures its total error (with P rounded to e4m3)."""

from __future__ import annotations

import pytest
import torch

from wanfast import attention
from wanfast.kernels import fp8_attention as fa
from wanfast.kernels.fp8_attention import (
    dequantize_heads,
    fa3_fp8_attention,
    fp8_attention_reference,
    quantize_heads,
)


def exact(q, k, v):
    w = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), v.double())


def inputs(offset: float = 0.0, seed: int = 0, length: int = 200):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, length, 4, 128, generator=g) for _ in range(3))
    return q, k + offset * torch.randn(2, 1, 4, 128, generator=g), v


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_quantize_heads_scales_each_head_to_the_e4m3_range():
    q, _, _ = inputs()
    q[1, :, 2] *= 50  # one head of one batch far larger: its own scale
    q8, scale = quantize_heads(q)
    assert q8.dtype == torch.float8_e4m3fn and q8.shape == q.shape and scale.shape == (2, 4)
    assert torch.allclose(q8.float().abs().amax(dim=(1, 3)), torch.full((2, 4), 448.0))
    assert scale[1, 2] > 40 * scale[0, 2]
    assert rel(dequantize_heads(q8, scale), q) < 0.03  # e4m3: 3 mantissa bits, measured 0.026


def test_smoothing_leaves_attention_unchanged_in_exact_arithmetic():
    q, k, v = (x.double() for x in inputs(offset=8.0))
    assert rel(exact(q, k - k.mean(dim=1, keepdim=True), v), exact(q, k, v)) < 1e-12


@pytest.mark.parametrize("offset", [0.0, 8.0, 30.0])
def test_reference_error_vs_exact_and_what_smoothing_buys(offset):
    q, k, v = inputs(offset)
    ref = exact(q, k, v)
    assert rel(fp8_attention_reference(q, k, v), ref) < 0.06  # measured 0.045 at every offset
    unsmoothed = exact(*(dequantize_heads(*quantize_heads(x)) for x in (q, k, v)))
    if offset >= 8:  # without smoothing the keys' common component eats the e4m3 range
        assert rel(unsmoothed, ref) > 4 * rel(fp8_attention_reference(q, k, v), ref)


@pytest.fixture
def cpu_kernel(monkeypatch):
    """A CPU stand-in for FA3's e4m3 kernel: the dequantised exact attention, recording its calls."""
    calls = []

    def kernel(q8, k8, v8, q_descale, k_descale, v_descale):
        calls.append((q8.dtype, q_descale.shape))
        parts = (
            dequantize_heads(q8, q_descale),
            dequantize_heads(k8, k_descale),
            dequantize_heads(v8, v_descale),
        )
        return exact(*parts).to(torch.bfloat16), None  # FA3 returns (out, lse) in some releases

    monkeypatch.setitem(fa._KERNEL, "fn", kernel)
    return calls


def test_backend_passes_each_descale_to_its_operand(cpu_kernel):
    q, k, v = (x.to(torch.bfloat16) for x in inputs(offset=8.0, length=64))
    out = fa3_fp8_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    assert cpu_kernel == [(torch.float8_e4m3fn, (2, 4))]
    assert rel(out, fp8_attention_reference(q, k, v)) < 1e-2  # same math; bf16 output rounding


def test_backend_traces_whole_under_compile(cpu_kernel):
    """The quantisation is traced (and so fused by inductor on the GPU); the FA3 call is one opaque op."""
    q, k, v = (x.to(torch.bfloat16) for x in inputs(length=48))
    seen = []

    def record(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        return gm.forward

    compiled = torch.compile(fa3_fp8_attention, fullgraph=True, backend=record)
    assert torch.equal(compiled(q, k, v), fa3_fp8_attention(q, k, v))
    assert "wanfast.fa3_fp8.default" in seen and any("amax" in s for s in seen)


def test_registry_entry_is_lossy_hopper_only_and_never_auto(monkeypatch):
    backend = attention._REGISTRY["fa3-fp8"]
    assert backend.lossy
    monkeypatch.setattr(attention, "_AUTO_ORDER_CUDA", ("fa3-fp8", "sdpa"))
    assert attention.resolve_backend("auto", "cuda") == "sdpa"  # lossy entries are skipped by auto
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'fa3-fp8' is not available"):
            attention.resolve_backend("fa3-fp8", "cpu")


def test_probe_kernel_only_quantises_once_and_matches_the_backend(cpu_kernel, monkeypatch):
    """benchmarks/attn8_gpu.py's `fa3-fp8-kernel-only` entry (the FA3 kernel without the quantisation
    passes): the inputs are quantised on the first call only, and the output is the backend's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attn8_gpu.py"
    spec = importlib.util.spec_from_file_location("attn8_gpu", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    quantised = []
    real = fa.quantize_heads
    monkeypatch.setattr(
        fa, "quantize_heads", lambda x, smooth=False: quantised.append(smooth) or real(x, smooth)
    )
    run = probe._kernel_only(fa)
    q, k, v = (x.to(torch.bfloat16) for x in inputs(offset=8.0, length=64))
    first, second = run(q, k, v), run(q, k, v)
    assert quantised == [False, True, False]  # q, smoothed k, v: once
    assert torch.equal(first, second) and len(cpu_kernel) == 2
    assert torch.equal(first.to(torch.bfloat16), fa3_fp8_attention(q, k, v))
