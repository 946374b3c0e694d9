"""The 8-bit self-attention (wanfast/kernels/attn8.py) and the self-attention backend slot.

What runs where:
- ``attn8_reference`` (pure torch) against exact attention: error bounds per precision, measured first;
- the Triton kernel in Triton's CPU interpreter, against the reference, on its INT8 Q/K path with
  ``pv="fp32"``. The FP8 and bf16 paths cannot be checked there: the interpreter (Triton 3.6, numpy
  2.4; numpy has no fp8/bf16) converts fp32 -> e4m3 / bf16 wrongly (e.g. -7.8 -> -4.0 in e4m3, bf16 off by
  one ulp) and its fp8 and bf16 ``tl.dot`` return garbage (errors of 1e10 measured), so such a test would
  test the interpreter. Those paths are checked against the reference by the CUDA-only test below and by
  ``benchmarks/attn8_gpu.py`` (accuracy vs exact attention at real size);
- every precision variant compiled ahead of time for sm_90 (Triton's CUDA backend needs no GPU for
  that): the FP8 paths' first GPU run failed in compilation (a masked fp8 load with an int ``other``),
  which this catches on the CPU; the PTX must use Hopper's wgmma with the intended operand types;
- the registry: lossy, never "auto", the self-attention slot serves self-attention only.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from helpers import run_in_triton_interpreter

from wanfast import attention
from wanfast.accel import choose_attention
from wanfast.accel.fuse import fuse_projections
from wanfast.config import EngineSettings
from wanfast.kernels.attn8 import attn8_reference, quantize_blocks_reference
from wanfast.models.dit import WanDiT
from wanfast.specs import SPECS

SAGE8 = ("sage8", "sage8-pv16", "sage8-int8")


def exact(q, k, v):
    """Softmax attention in float64 on [B, L, H, D], independent of the code under test."""
    w = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum("bhqk,bkhd->bqhd", w.softmax(-1), v.double())


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(seed: int, L: int = 200, D: int = 64, shift: float = 0.0, dtype=torch.bfloat16):
    """q, k, v [1, L, 2, D]; k offset by ``shift`` x a random vector per head (a common component)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, L, 2, D, generator=g) for _ in range(3))
    k = k + shift * torch.randn(1, 1, 2, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# Max over 4 seeds x D in (64, 128) x shift in (0, 30), L = 200 (not a multiple of 64), random data (a
# near-uniform softmax: the hard case for 8-bit P), measured: bound ~1.5x the measurement.
BOUNDS = {  # (qk, pv): (measured, bound)
    ("fp8", "fp8"): (0.0526, 0.08),
    ("fp8", "bf16"): (0.0390, 0.06),
    ("int8", "fp8"): (0.0373, 0.06),
    ("int8", "bf16"): (0.0132, 0.02),
}


@pytest.mark.parametrize("mode", list(BOUNDS))
def test_reference_error_vs_exact_attention(mode):
    errs = {}
    for seed in range(2):
        for D in (64, 128):
            for shift in (0.0, 30.0):
                q, k, v = qkv(seed, D=D, shift=shift)
                errs[seed, D, shift] = rel(attn8_reference(q, k, v, *mode), exact(q, k, v))
    assert max(errs.values()) < BOUNDS[mode][1], errs
    # smoothing removes the common K component: shifted keys are no worse than centred ones
    for (seed, D, shift), e in errs.items():
        if shift:
            assert e < 1.2 * errs[seed, D, 0.0], errs


def test_smoothing_is_what_makes_shifted_keys_quantisable():
    """Without the mean subtraction, an INT8 K block scale set by the offset (30x) drowns the signal."""
    q, k, v = qkv(0, shift=30.0, dtype=torch.float32)
    k8, ks = quantize_blocks_reference(k, "int8")  # no smoothing: [1, L, 2, D], [1, 2, nblk]
    per_row = ks.repeat_interleave(64, dim=2)[:, :, : k.shape[1]].transpose(1, 2)[..., None]
    unsmoothed = rel(exact(q, k8 * per_row, v), exact(q, k, v))
    smoothed = rel(attn8_reference(q, k, v, "int8", "none"), exact(q, k, v))
    assert smoothed < 0.02 and unsmoothed > 5 * smoothed, (smoothed, unsmoothed)


@pytest.mark.parametrize("block_n", [64, 128])
def test_reference_without_rounding_is_exact_attention(block_n):
    """qk="none", pv="none": smoothing, block scales, log2 domain and online softmax without rounding."""
    for L, D, shift in [(200, 64, 0.0), (130, 128, 30.0), (64, 64, 5.0)]:
        q, k, v = qkv(L, L=L, D=D, shift=shift, dtype=torch.float32)
        assert rel(attn8_reference(q, k, v, "none", "none", block_n=block_n), exact(q, k, v)) < 1e-5


def test_reference_cross_lengths_and_tiny():
    """Lq != Lk (Ulysses pads queries, cuts keys) and a single token."""
    q, _, _ = qkv(1, L=70, dtype=torch.float32)
    _, k, v = qkv(2, L=150, dtype=torch.float32)
    assert rel(attn8_reference(q, k, v, "none", "none"), exact(q, k, v)) < 1e-5
    assert rel(attn8_reference(q, k, v, "int8", "bf16"), exact(q, k, v)) < 0.02
    q, k, v = qkv(3, L=1, dtype=torch.float32)
    assert rel(attn8_reference(q, k, v, "fp8", "fp8"), v) < 0.05  # one key: out = v up to rounding


_INTERPRETED = textwrap.dedent("""
    import math, torch
    from wanfast.kernels import attn8 as A

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    # (Lq, Lk, D, config): tails of every size, Lq != Lk, both head dims, each tile shape
    for lq, lk, d, cfg in [(150, 150, 64, (64, 64, 4, 3)), (130, 200, 128, (128, 64, 8, 3)),
                           (64, 64, 64, (64, 128, 4, 2)), (100, 257, 64, (128, 128, 8, 2))]:
        # q, k, v as strided views of one fused [B, L, 3, H, D] tensor (the fused QKV projection's
        # layout: token stride 3*H*D), k with a common offset
        x = torch.randn(2, max(lq, lk), 3, 3, d, generator=g)
        q, k, v = x[:, :lq, 0], x[:, :lk, 1] + 20 * torch.randn(1, 1, 3, d, generator=g), x[:, :lk, 2]
        out = A.attn8(q, k, v, "int8", "fp32", config=cfg)
        ref = A.attn8_reference(q, k, v, "int8", "none", block_n=cfg[1])
        worst = max(worst, rel(out, ref))
        assert out.shape == q.shape and rel(out, ref) < 1e-5, (lq, lk, d, cfg, rel(out, ref))
    # the pre-pass alone: INT8 blocks and scales equal the reference's bit for bit
    q8, qs, k8, ks, _, _ = A.quantize(q, k, v, "int8", "fp32")
    rq8, rqs = A.quantize_blocks_reference(q, "int8", A.LOG2E / math.sqrt(q.shape[-1]))
    rk8, rks = A.quantize_blocks_reference(k, "int8", mean=k.float().mean(dim=1))
    assert torch.equal(q8.float(), rq8) and torch.equal(k8.float(), rk8)
    assert torch.allclose(qs, rqs, rtol=1e-6) and torch.allclose(ks, rks, rtol=1e-6)
    print("worst", worst)
""")


def test_triton_kernel_in_the_cpu_interpreter_matches_the_reference():
    """The kernel itself (INT8 Q/K, fp32 P/V: what the interpreter computes correctly) vs the reference.
    TRITON_INTERPRET must be set before triton is imported: a subprocess."""
    assert "worst" in run_in_triton_interpreter(_INTERPRETED)


@pytest.mark.parametrize("qk,pv", [("fp8", "fp8"), ("fp8", "bf16"), ("int8", "fp8"), ("int8", "bf16")])
def test_every_variant_compiles_for_hopper_with_wgmma(qk, pv):
    import inspect

    triton = pytest.importorskip("triton", reason="the test extra installs triton on Linux x86-64")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from wanfast.kernels import attn8

    qk_t = "*fp8e4nv" if qk == "fp8" else "*i8"
    ptrs = {"Q8": qk_t, "K8": qk_t, "V": "*fp8e4nv" if pv == "fp8" else "*bf16", "QS": "*fp32",
            "KS": "*fp32", "VS": "*fp32", "Out": "*bf16"}  # fmt: skip
    const = dict(D=128, SBLK=64, INT8=qk == "int8", PV_FP8=pv == "fp8", PV_FP32=False, INTERPRET=False)
    fn = attn8._attn8_kernel
    for block_m, block_n, warps, stages in {attn8.CONFIGS[0], attn8.CONFIGS[-1]}:
        consts = dict(const, BLOCK_M=block_m, BLOCK_N=block_n)
        sig = {
            p: "constexpr" if p in consts else ptrs.get(p, "i32") for p in inspect.signature(fn.fn).parameters
        }
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps, "num_stages": stages})  # fmt: skip
        ptx = kernel.asm["ptx"]
        qk_op = ".e4m3.e4m3" if qk == "fp8" else ".s32.s8.s8"
        pv_op = ".e4m3.e4m3" if pv == "fp8" else ".bf16.bf16"
        assert any(qk_op in line for line in ptx.splitlines() if "wgmma.mma_async" in line), (qk, pv)
        assert any(pv_op in line for line in ptx.splitlines() if "wgmma.mma_async" in line), (qk, pv)


def test_fp8_kernel_on_hopper_matches_the_reference():
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9):
        pytest.skip("CUDA-only: the FP8 / bf16 paths need a Hopper GPU (the CPU interpreter's fp8 is wrong)")
    from wanfast.kernels.attn8 import attn8

    q, k, v = (t.cuda() for t in qkv(0, L=1000, D=128, shift=30.0))
    e = exact(q.cpu(), k.cpu(), v.cpu())
    for qk, pv in BOUNDS:
        out = attn8(q, k, v, qk, pv)
        ref = attn8_reference(q, k, v, qk, pv)
        assert rel(out, ref) < 0.02, (qk, pv, rel(out, ref))  # summation order, exp2, MMA accumulation
        assert rel(out.cpu(), e) < BOUNDS[qk, pv][1]


# ---------------------------------------------------------------------------------------------------
# the registry and the self-attention slot
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, no backend chosen; restored after."""
    monkeypatch.setattr(attention, "_REGISTRY", dict(attention._REGISTRY))
    monkeypatch.setattr(attention, "_KERNELS", dict(attention._KERNELS))
    monkeypatch.setattr(attention, "_active", None)
    monkeypatch.setattr(attention, "_self_active", None)


def test_sage8_backends_are_lossy_hopper_only_and_never_auto(registry, monkeypatch):
    for name in SAGE8:
        assert attention._REGISTRY[name].lossy
        if not torch.cuda.is_available():
            assert not attention._REGISTRY[name].available()
        fn = attention._REGISTRY[name].factory()  # a torch custom op: compile(fullgraph) sees one node
        assert isinstance(fn, torch._library.custom_ops.CustomOpDef)
        real = attention._REGISTRY[name]
        monkeypatch.setitem(attention._REGISTRY, name, attention.Backend(real.factory, lambda: True, True))
    monkeypatch.setattr(attention, "_AUTO_ORDER_CUDA", (*SAGE8, "sdpa"))
    assert attention.resolve_backend("auto", "cuda") == "sdpa"


def test_unavailable_self_attention_backend_fails_clearly(registry):
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'sage8' is not available here"):
            attention.set_self_attention_backend("sage8", "cpu")
        with pytest.raises(RuntimeError, match="'sage8' is not available here"):
            choose_attention(EngineSettings(device="cpu", self_attention_backend="sage8"))
    with pytest.raises(ValueError, match="unknown attention backend 'sage9'"):
        attention.set_backend("sdpa", self_attention="sage9")
    assert attention._self_active is None


@pytest.mark.parametrize("fused", [False, True])
def test_self_attention_slot_serves_self_attention_only(registry, fused, caplog):
    cfg = SPECS["tiny"].dit  # 4 heads of 16, 2 layers, text_len 32
    calls = {"self": [], "all": []}

    def counting(slot):
        def factory():
            def fn(q, k, v):
                calls[slot].append(tuple(k.shape))
                return exact(q, k, v).to(q.dtype)

            return fn

        return factory

    attention.register_backend("count-self", counting("self"), lambda: True, lossy=True)
    attention.register_backend("count-all", counting("all"), lambda: True)
    torch.manual_seed(0)
    model = WanDiT(cfg).eval()
    if fused:
        fuse_projections(model)  # FusedSelfAttention: the default engine path
    x, t, ctx = torch.randn(1, 16, 3, 6, 8), torch.tensor([500.0]), torch.randn(1, 7, cfg.text_dim)
    settings = EngineSettings(
        device="cpu", attention_backend="count-all", self_attention_backend="count-self"
    )
    with caplog.at_level("INFO", logger="wanfast.attention"):
        assert choose_attention(settings) == "count-all"
    assert "self-attention backend: count-self (lossy" in caplog.text
    assert attention.active_self_attention_backend() == "count-self"
    with torch.no_grad():
        out = model(x, t, ctx)
    L = 3 * 3 * 4  # (f, h/2, w/2) patch grid
    assert calls == {"self": [(1, L, 4, 16)] * cfg.num_layers, "all": [(1, 32, 4, 16)] * cfg.num_layers}
    # None: self-attention follows the default backend again
    choose_attention(EngineSettings(device="cpu", attention_backend="count-all"))
    assert attention.active_self_attention_backend() == "count-all"
    with torch.no_grad():
        again = model(x, t, ctx)
    assert len(calls["all"]) == 3 * cfg.num_layers and len(calls["self"]) == cfg.num_layers
    assert rel(again, out) < 1e-5  # both slots computed exact attention
