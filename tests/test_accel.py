"""wanfast.accel on the tiny DiT (fp32, CPU): every optimisation alone and together against the plain model.

Tolerance: relative error <= 1e-5 in fp32 (the optimisations reorder no reduction the plain model does,
except inside fused GEMMs and inductor kernels).

Compile tests use the "aot_eager" backend by default: Dynamo's tracing (fullgraph), guards and recompile
decisions are exactly those of inductor, without its code generation, which takes ~45 s per graph cold on
a 2-core CPU. ``WANFAST_TEST_COMPILE_BACKEND=inductor`` runs the same tests through inductor (all pass,
~1 min more); benchmarks/accel_gpu_check.py checks inductor on the GPU.
"""

from __future__ import annotations

import copy
import gc
import os
import weakref
from dataclasses import replace

import pytest
import torch
from helpers import random_dit
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from wanfast.accel import each_alone, optimize_dit, optimize_pipeline, reset_caches
from wanfast.accel.caches import CrossKVCache, RopeCache, TimeEmbedCache, caches_of
from wanfast.accel.compile import is_compiled
from wanfast.accel.fuse import FusedCrossAttention, FusedSelfAttention
from wanfast.accel.graphs import CUDAGraphDiT
from wanfast.config import EngineSettings
from wanfast.models import dit as dit_module
from wanfast.models.dit import Attention, WanDiT, rope_freqs
from wanfast.pipeline import denoise
from wanfast.specs import SPECS, resolve_params

CFG = SPECS["tiny"].dit  # dim 64, 4 heads, 2 layers, text_dim 32, text_len 32
TOL = 1e-5
COMPILE_BACKEND = os.environ.get("WANFAST_TEST_COMPILE_BACKEND", "aot_eager")
ALL = EngineSettings(device="cpu", dtype=torch.float32, compile=True)  # every switch on but cuda_graphs
PLAIN = ALL.plain()
ALONE = {**each_alone(ALL, ("fuse", "rope", "cross_kv", "compile")), "all": ALL}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_model(seed: int = 0) -> WanDiT:
    return random_dit(CFG, seed)


def optimized(model: WanDiT, settings: EngineSettings) -> torch.nn.Module:
    return optimize_dit(copy.deepcopy(model), settings, compile_backend=COMPILE_BACKEND)


@pytest.fixture(scope="module")
def plain():
    return random_model()


def inputs(seed: int = 1, shape=(1, 16, 3, 6, 8)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    cond, uncond = [torch.randn(7, CFG.text_dim, generator=g)], [torch.randn(11, CFG.text_dim, generator=g)]
    return x, cond, uncond


class Calls:
    """Counts forward calls of some modules."""

    def __init__(self, modules):
        self.n = 0
        for m in modules:
            m.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))


def kv_projections(dit: WanDiT) -> Calls:
    attn = [b.cross_attn for b in dit.blocks]
    return Calls(a.wkv if isinstance(a, FusedCrossAttention) else a.k for a in attn)


@pytest.mark.parametrize("name", list(ALONE))
@torch.no_grad()
def test_alone_and_together_match_plain(plain, name):
    model = optimized(plain, ALONE[name])
    x, cond, uncond = inputs()
    for t in (999.0, 937.0):  # two steps, each a CFG pair sharing one t tensor
        t = torch.tensor([t])
        for ctx in (cond, uncond):
            out = model(x, t, ctx)
            assert out.shape == x.shape and rel_err(out, plain(x, t, ctx)) <= TOL
    assert out.std() > 0.1  # a real output, not a degenerate one


def test_plain_settings_apply_nothing(plain):
    model = copy.deepcopy(plain)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert optimize_dit(model, PLAIN) is model
    assert all(type(b.self_attn) is Attention and type(b.cross_attn) is Attention for b in model.blocks)
    assert not any(is_compiled(b) or b._forward_pre_hooks for b in model.blocks)
    assert not caches_of(model) and not {"rope", "embed_text", "time_embed"} & set(vars(model))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_fused_weights_are_the_concatenation_and_originals_are_freed(plain):
    model = copy.deepcopy(plain)
    b0 = model.blocks[0]
    q_ref = weakref.ref(b0.self_attn.q.weight)
    old = [{n: getattr(a, n).weight.clone() for n in "qkv"} for a in (b0.self_attn, b0.cross_attn)]
    old_bias = [torch.cat([getattr(a, n).bias for n in "qkv"]) for a in (b0.self_attn, b0.cross_attn)]
    n_params = sum(p.numel() for p in model.parameters())
    optimize_dit(model, replace(PLAIN, fuse_projections=True))
    sa, ca = b0.self_attn, b0.cross_attn
    assert isinstance(sa, FusedSelfAttention) and isinstance(ca, FusedCrossAttention)
    assert torch.equal(sa.wqkv.weight, torch.cat([old[0]["q"], old[0]["k"], old[0]["v"]]))  # [3C, C]
    assert torch.equal(sa.wqkv.bias, old_bias[0])
    assert torch.equal(ca.wkv.weight, torch.cat([old[1]["k"], old[1]["v"]]))  # [2C, C]
    assert torch.equal(ca.wkv.bias, old_bias[1][CFG.dim :])
    assert torch.equal(ca.q.weight, old[1]["q"])
    assert not hasattr(sa, "q") and not hasattr(ca, "k") and not hasattr(ca, "v")
    gc.collect()
    assert q_ref() is None  # the separate projection weights are gone, not kept beside the fused ones
    assert sum(p.numel() for p in model.parameters()) == n_params


@torch.no_grad()
def test_cross_kv_cache_hits_and_invalidates(plain):
    model = optimized(plain, replace(PLAIN, fuse_projections=True, cache_cross_kv=True))
    cache = next(c for c in caches_of(model) if isinstance(c, CrossKVCache))
    proj, text = kv_projections(model), Calls([model.text_embedding])
    x, cond, uncond = inputs()
    t = torch.tensor([500.0])
    L = CFG.num_layers

    model(x, t, cond)
    assert (proj.n, text.n) == (L, 1)  # first step: one K/V projection per block
    model(x, t, cond)
    assert (proj.n, text.n) == (L, 1) and cache.kv_hits == L  # second step: all hits
    model(x, t, uncond)
    assert (proj.n, text.n) == (2 * L, 2)  # a new context misses
    cond[0].add_(0.5)  # in place: the version counter changes, the cached K/V are stale
    out = model(x, t, cond)
    assert (proj.n, text.n) == (3 * L, 3) and rel_err(out, plain(x, t, cond)) <= TOL
    assert reset_caches(model) == 2  # cross-K/V and time embedding; RoPE tables are kept
    model(x, t, uncond)
    assert (proj.n, text.n) == (4 * L, 4)
    for _ in range(6):  # bounded: at most max_prompts prompts stay cached
        model(x, t, [torch.randn(5, CFG.text_dim)])
    assert len(cache.prompts) == cache.max_prompts == len(cache.by_ctx)


def test_cross_kv_cache_under_inference_mode(plain):
    """Inference tensors have no version counter: identity alone keys them, and reset clears them."""
    model = optimized(plain, replace(PLAIN, cache_cross_kv=True))
    proj = kv_projections(model)
    with torch.inference_mode():
        x, cond, _ = inputs()
        t = torch.tensor([500.0])
        a = model(x, t, cond)
        b = model(x, t, cond)
        assert proj.n == CFG.num_layers and torch.equal(a, b)
        reset_caches(model)
        model(x, t, cond)
        assert proj.n == 2 * CFG.num_layers


@torch.no_grad()
def test_time_embedding_once_per_step(plain, monkeypatch):
    model = optimized(plain, replace(PLAIN, cache_cross_kv=True))
    calls = []
    sinusoid = dit_module.sinusoidal_embedding
    monkeypatch.setattr(
        dit_module, "sinusoidal_embedding", lambda t, dim: calls.append(t) or sinusoid(t, dim)
    )
    x, cond, uncond = inputs()
    for i, step in enumerate((999.0, 937.0, 833.0)):
        t = torch.tensor([step])
        model(x, t, cond)
        model(x, t, uncond)  # the CFG pair shares t: one embedding per step
        assert len(calls) == i + 1
    cache = next(c for c in caches_of(model) if isinstance(c, TimeEmbedCache))
    assert (cache.hits, cache.misses) == (3, 3)


@torch.no_grad()
def test_rope_cache_hit(plain):
    model = optimized(plain, replace(PLAIN, cache_rope=True))
    cache = next(c for c in caches_of(model) if isinstance(c, RopeCache))
    x, cond, _ = inputs()
    first = model.rope((3, 3, 4), torch.device("cpu"))
    model(x, torch.tensor([1.0]), cond)  # latent (3, 6, 8) -> grid (3, 3, 4): a hit
    assert (cache.hits, cache.misses) == (1, 1)
    assert model.rope((3, 3, 4), torch.device("cpu"))[0] is first[0]  # the same table, not a recomputation
    assert all(torch.equal(a, b) for a, b in zip(first, rope_freqs(CFG, (3, 3, 4)), strict=True))
    model(*inputs(shape=(1, 16, 2, 4, 4))[:1], torch.tensor([1.0]), cond)  # a new shape: a miss
    assert (cache.hits, cache.misses) == (2, 2) and len(cache.tables) == 2


def run_denoise(experts, seed: int = 0, steps: int = 4):
    params = resolve_params(SPECS["tiny"], "x", steps=steps, shift=5.0, boundary=0.9,
                            guidance_high_noise=4.0, guidance_low_noise=3.0)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(16, 3, 6, 8, generator=g)
    ctx, ctx_null = [torch.randn(7, CFG.text_dim, generator=g)], [torch.randn(9, CFG.text_dim, generator=g)]
    with torch.no_grad():
        latents, counts = denoise(experts, noise, ctx, ctx_null, params)
    assert counts["high_noise"] > 0 and counts["low_noise"] > 0  # both experts ran
    return latents


@pytest.fixture(scope="module")
def experts(plain):
    return {"high_noise": plain, "low_noise": random_model(seed=1)}


def test_denoise_with_optimized_experts_matches_plain(experts):
    fast = {k: optimized(m, ALL) for k, m in experts.items()}
    assert rel_err(run_denoise(fast), run_denoise(experts)) <= TOL
    kv = [c for m in fast.values() for c in caches_of(m) if isinstance(c, CrossKVCache)]
    assert all(c.kv_hits > 0 for c in kv)  # the cached path really served the later steps


def test_compiled_denoise_matches_plain_and_never_recompiles(experts):
    """Regional compile of both experts: several denoising steps (timestep, CFG pair and expert changes)
    after a warm-up run must not recompile: error_on_recompile turns a recompile into an error."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    fast = {k: optimized(m, ALL) for k, m in experts.items()}
    assert all(is_compiled(b) for m in fast.values() for b in m.blocks)
    warm = run_denoise(fast, seed=0, steps=2)  # compiles (one graph per block input dtype)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = run_denoise(fast, seed=1, steps=4)  # new noise, prompts and timesteps
        assert counters["stats"]["unique_graphs"] == graphs
        with pytest.raises(Exception, match="[Rr]ecompil"):  # the guard is live: a new shape would recompile
            fast["low_noise"](
                torch.randn(1, 16, 1, 4, 4), torch.tensor([10.0]), [torch.randn(3, CFG.text_dim)]
            )
    assert rel_err(warm, run_denoise(experts, seed=0, steps=2)) <= TOL
    assert rel_err(out, run_denoise(experts, seed=1, steps=4)) <= TOL


class _FunctionGuard(TorchFunctionMode):
    """Fails on tensor -> Python value conversions (a host sync for a device tensor)."""

    BANNED = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.BANNED:
            raise AssertionError(f"host sync in the forward: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


class _DispatchGuard(TorchDispatchMode):
    """Fails on the aten ops that read device values on the host (what .item()/bool() dispatch to)."""

    BANNED = ("_local_scalar_dense", "is_nonzero", "equal", "nonzero")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.BANNED:
            raise AssertionError(f"host sync in the forward: aten.{func.__name__}")
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_no_host_sync_in_the_optimized_forward(plain):
    with pytest.raises(AssertionError, match="host sync"), _DispatchGuard():
        bool(torch.ones(1))  # the guards do catch a sync
    with pytest.raises(AssertionError, match="host sync"), _FunctionGuard():
        torch.ones(1).tolist()
    model = optimized(
        plain, replace(ALL, compile=False)
    )  # compiled blocks: fullgraph already forbids .item()
    x, cond, _ = inputs()
    t = torch.tensor([500.0])
    for _ in range(2):  # cache misses, then hits
        with _FunctionGuard(), _DispatchGuard():
            model(x, t, cond)


def fake_capture(fn):
    """CPU stand-in for a CUDA graph: a static output buffer that ``replay`` rewrites from the static
    inputs, as a replayed graph does."""
    out = fn()
    return out, lambda: out.copy_(fn())


@torch.no_grad()
def test_cuda_graph_wrapper_logic(plain):
    cached = optimized(plain, replace(ALL, compile=False))
    graphed = CUDAGraphDiT(cached, max_graphs=2, capture=fake_capture)
    assert len(caches_of(graphed)) == 3 and not any(c.enabled for c in caches_of(graphed))
    seen = []  # a disabled cross-K/V cache still feeds blocks (k, v): compiled blocks see the same inputs
    cached.blocks[0].register_forward_pre_hook(lambda block, args: seen.append(type(args[2])))
    x, cond, uncond = inputs()
    outs = []
    for step in (999.0, 937.0):
        t = torch.tensor([step])
        for ctx in (cond, uncond):  # new values each call go through the static buffers
            outs.append(graphed(x + step / 1000, t, ctx))
            assert rel_err(outs[-1], plain(x + step / 1000, t, ctx)) <= TOL
    assert graphed.captures == 1  # one per signature: text padded to text_len, so the CFG pair shares it
    assert seen and all(kind is tuple for kind in seen)
    outs[0].zero_()  # callers own their output: a copy, not the static buffer
    assert graphed(x, torch.tensor([1.0]), cond).abs().sum() > 0
    x2, cond2, _ = inputs(shape=(1, 16, 2, 4, 4))
    graphed(x2, torch.tensor([1.0]), cond2)
    x3, cond3, _ = inputs(shape=(1, 16, 1, 4, 4))
    graphed(x3, torch.tensor([1.0]), cond3)
    assert graphed.captures == 3 and len(graphed.graphs) == 2  # LRU-bounded
    with pytest.raises(ValueError, match="cuda_graphs needs"):
        optimize_dit(copy.deepcopy(plain), replace(PLAIN, cuda_graphs=True))


def test_pipeline_is_optimized_and_reset_per_request():
    from wanfast.tools.synthetic import random_pipeline

    preset = SPECS["tiny"]
    pipes = [random_pipeline(preset, "cpu", torch.float32, torch.float32, settings=s) for s in (None, PLAIN)]
    fast, slow = pipes
    assert fast.settings.fuse_projections and fast.settings.compile is None  # defaults: compile off on CPU
    assert all(isinstance(m.blocks[0].self_attn, FusedSelfAttention) for m in fast.experts.values())
    assert not any(caches_of(m) for m in slow.experts.values())
    params = fast.params("a cat", size=(64, 48), frames=5, steps=3, boundary=0.9, seed=2)
    a, b = fast.run(params), slow.run(params)
    assert rel_err(a.latents, b.latents) <= TOL
    kv = [c for m in fast.experts.values() for c in caches_of(m) if isinstance(c, CrossKVCache)]
    assert [len(c.prompts) for c in kv] == [2, 2]  # prompt and negative prompt, per expert
    fast.run(params)  # a new request starts from empty caches (else 4 prompts would be held)
    assert [len(c.prompts) for c in kv] == [2, 2]
    optimize_pipeline(slow)  # plain settings: nothing changes
    assert not any(caches_of(m) for m in slow.experts.values())


@pytest.mark.parametrize(
    "mode, expected",
    [
        (None, {}),
        ("coordinate-descent", {"options": {"coordinate_descent_tuning": True}}),
        ("max-autotune", {"mode": "max-autotune-no-cudagraphs"}),  # CUDA graphs keep their own switch
    ],
)
def test_compile_mode_reaches_torch_compile(plain, monkeypatch, mode, expected):
    from wanfast.accel import compile as compile_mod

    seen = []

    def fake_compile(fn, **kw):
        seen.append(kw)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    dit = copy.deepcopy(plain)
    assert compile_mod.compile_blocks(dit, "inductor", mode) == len(dit.blocks)
    assert seen and all(
        kw == {"fullgraph": True, "dynamic": False, "backend": "inductor", **expected} for kw in seen
    )


def test_compile_mode_errors(plain):
    from wanfast.accel import compile as compile_mod
    from wanfast.config import ConfigError

    with pytest.raises(ConfigError, match="unknown compile mode 'fast'.*coordinate-descent, max-autotune"):
        compile_mod.compile_blocks(copy.deepcopy(plain), "inductor", "fast")
    with pytest.raises(ConfigError, match="tunes inductor's kernels; backend 'eager'"):
        compile_mod.compile_blocks(copy.deepcopy(plain), "eager", "max-autotune")
