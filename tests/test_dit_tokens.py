"""Per-token timesteps (TI2V): ``WanDiT(x, t, context)`` with t [B, L] or ``PerToken`` on a tiny TI2V-shaped
DiT (12 in/out channels, fp32, CPU), against Diffusers and through every accel / parallel path.

Tolerances (fp32 throughout):
- vs Diffusers, rel err <= 1e-5 (the issue's bound): the two models do the same float32 operations in
  other orders (GEMM blocking, attention kernels: ~1e-7 relative) and Diffusers forms the sinusoid's
  angles in float32 where official (and wanfast) use float64: at t <= 1000 the top frequencies' angles are
  off by up to ~1000 * 2^-24 = 6e-5 rad (3.5e-5 measured at t = 937.5), which alone moves the output by
  5e-7 relative here. Measured in total: 3e-7 .. 6e-7, a 15x margin.
- accel vs plain, rel err <= 1e-5, as tests/test_accel.py (fused GEMMs and traced graphs reorder sums).
- paths that do the same operations on the same values (t [B] vs all-equal t [B, L], dense vs factored
  t, offload, the per-token step cache at a tiny threshold): rel err <= 1e-6. A GEMM over another row
  count or order (the time MLP on U distinct rows instead of B), or over weights at another memory
  alignment (offload copies them), may take another BLAS kernel: a few ulps, ~1e-7 at the output.
"""

from __future__ import annotations

import copy
import os
import re
import socket
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import random_dit, rel_err

from wanfast.accel import choose_attention, optimize_dit
from wanfast.accel.caches import TimeEmbedCache, caches_of
from wanfast.accel.graphs import CUDAGraphDiT
from wanfast.accel.offload import Offload, OffloadedExpert
from wanfast.accel.stepcache import StepCache, installed
from wanfast.config import EngineSettings
from wanfast.models import dit as dit_module
from wanfast.models.dit import PerToken, WanDiT, factor_timesteps, first_frame_timesteps
from wanfast.specs import SPECS

CFG = replace(SPECS["tiny"].dit, in_dim=12, out_dim=12)  # dim 64, 4 heads, 2 layers, text_dim 32
COMPILE_BACKEND = os.environ.get("WANFAST_TEST_COMPILE_BACKEND", "aot_eager")  # as tests/test_accel.py
ALL = EngineSettings(device="cpu", dtype=torch.float32, compile=True)  # every lossless switch but graphs


def random_model(cfg=CFG, seed: int = 0) -> WanDiT:
    return random_dit(cfg, seed)


def grid_of(shape) -> tuple[int, int, int]:
    _, _, f, h, w = shape
    return f, h // 2, w // 2  # patch (1, 2, 2)


def case(shape, ts, seed: int = 1):
    """x [B, 12, F, H, W], t [B], the first-frame-at-0 per-token t (PerToken and dense [B, L]), text."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    t = torch.tensor(ts)
    per = first_frame_timesteps(t, grid_of(shape))
    ctx = torch.randn(shape[0], CFG.text_len, CFG.text_dim, generator=g)  # padded to text_len already
    return x, t, per, per.table[per.index], ctx


@pytest.fixture(scope="module")
def plain():
    return random_model()


# ------------------------------------------------------------------ the model, against Diffusers


@pytest.fixture(scope="module")
def diffusers_model(plain):
    WanTransformer3DModel = pytest.importorskip("diffusers").WanTransformer3DModel  # the oracle

    from wanfast.loading import dit_keys

    ref = WanTransformer3DModel.from_config(dit_keys.diffusers_config_json(CFG)).eval()
    ref.load_state_dict(dit_keys.official_to_diffusers(plain.state_dict()), strict=True)
    return ref


SHAPES = [
    ((1, 12, 3, 6, 4), [937.5]),  # 18 tokens, the first frame's 6 at 0
    ((2, 12, 2, 4, 8), [937.0, 13.0]),  # a batch with different t per sample
]


@pytest.mark.parametrize("shape,ts", SHAPES)
@torch.no_grad()
def test_matches_diffusers_both_timestep_shapes(plain, diffusers_model, shape, ts):
    x, t, per, dense, ctx = case(shape, ts)
    assert dense.shape == (shape[0], shape[2] * shape[3] * shape[4] // 4)
    ref_b = diffusers_model(x, t, ctx, return_dict=False)[0]
    ref_tok = diffusers_model(x, dense, ctx, return_dict=False)[0]  # Diffusers' Wan2.2 TI2V path (2-D t)
    out_b, out_dense, out_per = plain(x, t, ctx), plain(x, dense, ctx), plain(x, per, ctx)
    assert out_dense.shape == x.shape and out_dense.dtype == torch.float32
    assert rel_err(out_b, ref_b) <= 1e-5
    assert rel_err(out_dense, ref_tok) <= 1e-5
    # factored by hand (rows 0, t_0, t_1) or by torch.unique (sorted rows): the same rows through the time
    # MLP, in another order (measured: equal bit for bit)
    assert rel_err(out_per, out_dense) <= 1e-6
    # the first frame's timestep 0 really changes the prediction, and not only on the first frame
    assert rel_err(out_dense, out_b) > 1e-2 and rel_err(out_dense[:, :, 1:], out_b[:, :, 1:]) > 1e-3


@pytest.mark.parametrize("batch", [1, 2])
@torch.no_grad()
def test_equal_per_token_timesteps_equal_per_sample(plain, batch):
    x, _, _, _, ctx = case((batch, 12, 2, 4, 6), [500.0] * batch)
    t = torch.tensor([500.0] * batch)
    dense = t[:, None].expand(batch, 12).contiguous()
    a, b = plain(x, t, ctx), plain(x, dense, ctx)
    # One row (U = 1) through the time MLP instead of B rows: the GEMMs may take another BLAS kernel, a few
    # ulps in e (measured: 0 at B = 1, 1.7e-7 at B = 2); everything after does the same ops on the same values
    assert rel_err(b, a) <= 1e-6
    assert torch.equal(plain(x, dense[:1], ctx), b)  # a [1, L] t is broadcast over the batch


def test_first_frame_timesteps_is_the_official_mask_times_t():
    t = torch.tensor([700.0, 21.0])
    lat = (3, 8, 6)  # latent frames, rows, cols; patch (1, 2, 2) -> grid (3, 4, 3)
    per = first_frame_timesteps(t, (3, 4, 3))
    mask = torch.ones(lat)
    mask[0] = 0  # official masks_like(zero=True) zeroes the first latent frame
    expected = torch.stack([(mask[:, ::2, ::2] * v).flatten() for v in t])  # [B, L] in (f, h, w) order
    assert isinstance(per, PerToken) and per.index.shape == (2, 36) and per.index.dtype == torch.int64
    assert torch.equal(per.table[per.index], expected)
    scalar = first_frame_timesteps(5.0, (2, 1, 1))
    assert scalar.table[scalar.index].tolist() == [[0.0, 5.0]]
    fac = factor_timesteps(expected)
    assert torch.equal(fac.table[fac.index], expected) and fac.table.tolist() == [0.0, 21.0, 700.0]


def test_per_token_shape_errors(plain):
    x, _, _, dense, ctx = case((1, 12, 2, 4, 4), [10.0])
    with pytest.raises(ValueError, match=r"per-token timesteps must be \[1, 8\].*got \(1, 7\)"):
        plain(x, dense[:, :7], ctx)
    with pytest.raises(ValueError, match=r"got \(3, 8\)"):
        plain(x, dense.expand(3, -1), ctx)


# ------------------------------------------------------------------ accel


def optimized(model: WanDiT, settings: EngineSettings = ALL) -> torch.nn.Module:
    return optimize_dit(copy.deepcopy(model), settings, compile_backend=COMPILE_BACKEND)


@torch.no_grad()
def test_optimized_equals_plain_and_embeds_once_per_step(plain, monkeypatch):
    """fuse + RoPE / cross-K/V / time caches + regional compile (fullgraph); two steps of a CFG pair with
    dense per-token t, one with a factored t: equal to plain, no recompile after the first step, and the
    time MLP runs once per step on the distinct values only."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    model = optimized(plain)
    rows = []  # rows through the sinusoid per call (the distinct timesteps, not the tokens)
    sinusoid = dit_module.sinusoidal_embedding
    monkeypatch.setattr(
        dit_module, "sinusoidal_embedding", lambda t, d: rows.append(t.numel()) or sinusoid(t, d)
    )
    shape = (1, 12, 3, 6, 4)
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 9, CFG.text_dim, generator=g), torch.randn(1, 5, CFG.text_dim, generator=g)

    def step(i: int, value: float) -> None:
        x, _, per, dense, _ = case(shape, [value], seed=i)
        t = per if i == 2 else dense
        for ctx in (cond, uncond):
            assert rel_err(model(x, t, ctx), plain(x, dense, ctx)) <= 1e-5

    step(0, 999.0)  # compiles
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):  # new values only: a recompile is an error
        step(1, 937.0)
        step(2, 833.0)
    assert counters["stats"]["unique_graphs"] == graphs >= 1
    cache = next(c for c in caches_of(model) if isinstance(c, TimeEmbedCache))
    assert (cache.hits, cache.misses) == (3, 3)
    # per step: the optimised pair embeds once (then a hit), plain twice; each time U = 2 rows, not L = 18
    assert rows == [2] * 9


@torch.no_grad()
def test_compiled_block_fuses_the_per_token_gather(plain):
    """Inductor (CPU codegen) on one block: with per-token modulation the rows are gathered inside the
    kernels that use them, so the graph allocates no more [B, l, C]-sized buffers than the per-sample graph
    (a materialised row would add one each, a [B, l, 6, C] table six)."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    choose_attention(ALL)  # traced code bakes the backend in (as optimize_dit does before compiling)
    block = copy.deepcopy(plain.blocks[0])
    block.forward = torch.compile(block.forward, fullgraph=True, dynamic=False, backend="inductor")
    B, L, C = 1, 24, CFG.dim
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(B, L, C, generator=g), torch.randn(B, CFG.text_len, C, generator=g)
    rope = dit_module.rope_freqs(CFG, (2, 3, 4))
    buffers = {}
    for name, t in (("sample", torch.tensor([900.0])), ("token", first_frame_timesteps(900.0, (2, 3, 4)))):
        e, e0 = plain.time_inputs(t, B, L)  # e0 [B, 6, C] or PerToken(table [2, 6, C], index [B, L])
        out, codes = run_and_get_code(block, x, e0, ctx, rope)
        torch.testing.assert_close(out, plain.blocks[0](x, e0, ctx, rope), rtol=1e-5, atol=1e-5)
        buffers[name] = [torch.Size(s).numel() for code in codes for s in _buffer_shapes(code)]
    sample, token = buffers["sample"], buffers["token"]
    assert sample and token and max(token) <= max(sample) < 6 * B * L * C, buffers
    assert sum(n == B * L * C for n in token) <= sum(n == B * L * C for n in sample), buffers


def _buffer_shapes(code: str) -> list[tuple[int, ...]]:
    """Shapes of the buffers an inductor CPU wrapper allocates (``empty_strided_cpu((d0, d1, ...), ...)``)."""
    found = re.findall(r"empty_strided_cpu\(\(([\d, ]*)\)", code)
    return [tuple(int(v) for v in m.split(",") if v.strip()) for m in found]


@torch.no_grad()
def test_cuda_graph_wrapper_factors_per_token_t(plain):
    def fake_capture(fn):
        out = fn()
        return out, lambda: out.copy_(fn())

    graphed = CUDAGraphDiT(optimized(plain, replace(ALL, compile=False)), capture=fake_capture)
    shape = (1, 12, 2, 4, 6)
    for i, step in enumerate((999.0, 500.0)):
        x, _, per, dense, ctx = case(shape, [step], seed=i)
        for t in (dense, per):  # a dense t is factored before the replay (torch.unique cannot be captured)
            assert rel_err(graphed(x, t, ctx), plain(x, dense, ctx)) <= 1e-5
    assert graphed.captures == 1  # values [2], index [1, L]: one signature for both forms and both steps
    x, t, _, _, ctx = case(shape, [3.0])
    graphed(x, t, ctx)
    assert graphed.captures == 2  # t [B] is another signature


@torch.no_grad()
def test_no_host_sync_with_factored_timesteps(plain):
    from test_accel import _DispatchGuard, _FunctionGuard

    model = optimized(plain, replace(ALL, compile=False))
    x, _, per, _, ctx = case((1, 12, 2, 4, 4), [500.0])
    for _ in range(2):  # cache miss, then hit
        with _FunctionGuard(), _DispatchGuard():
            model(x, per, ctx)


def test_fp8_linears_with_per_token_t(plain):
    low = copy.deepcopy(plain).to(torch.bfloat16)
    fp8 = optimize_dit(low, replace(ALL, dtype=torch.bfloat16, compile=False, quant="fp8"))
    x, t, per, dense, ctx = case((1, 12, 3, 6, 4), [700.0])
    with torch.no_grad():
        ref = plain(x, dense, ctx)
        out = fp8(x, per, ctx)
    assert torch.equal(out, fp8(x, dense, ctx))
    assert rel_err(out, ref) < 0.03  # FP8 block linears at dim 64 (as tests/test_fp8.py; measured ~0.01)
    assert rel_err(out, fp8(x, t, ctx)) > 1e-2  # the per-token path really ran


@pytest.mark.parametrize("mode", ["expert", "blocks"])
@torch.no_grad()
def test_offload_modes(plain, mode):
    pipe = SimpleNamespace(experts={"high_noise": copy.deepcopy(plain)})
    Offload(pipe, mode, torch.device("cpu"), pin=False)
    model = pipe.experts["high_noise"]
    assert isinstance(model, OffloadedExpert)
    x, _, per, dense, ctx = case((1, 12, 2, 4, 6), [640.0])
    assert rel_err(model(x, per, ctx), plain(x, dense, ctx)) <= 1e-6  # same ops; only memory moved


@torch.no_grad()
def test_step_cache_per_token(plain):
    """Tiny threshold: every call computed, equal to plain; huge threshold: the middle call is skipped
    (head(x0 + R)) and the final timestep, read as the largest per-token value, is forced."""
    dit = copy.deepcopy(plain)
    shape = (1, 12, 2, 4, 6)
    steps = (900.0, 880.0, 860.0)
    calls = [case(shape, [s], seed=0)[:4] for s in steps]  # nearly the same x: a skip is plausible
    ctx, null = [torch.randn(7, CFG.text_dim)], [torch.randn(5, CFG.text_dim)]
    for threshold, computed in ((1e-9, [True] * 3), (1e9, [True, False, True])):
        cache = StepCache(threshold, {"cond": ctx, "uncond": null}, force_t=(steps[-1],))
        with installed({"e": dit}, cache):
            outs = [dit(x, per, ctx) for x, _, per, _ in calls]
        assert [d.computed for d in cache.decisions] == computed
        assert [d.t for d in cache.decisions] == [None, *steps[1:]]  # the step's t, not the first frame's 0
        for out, (x, _, _, dense) in zip(outs, calls, strict=True):
            if threshold < 1:
                assert rel_err(out, plain(x, dense, ctx)) <= 1e-6
    # the skipped call reused the first call's residual: a different output from the computed one
    assert rel_err(outs[1], plain(calls[1][0], calls[1][3], ctx)) > 1e-6


# ------------------------------------------------------------------ Ulysses and CFG-parallel (gloo, 2 ranks)

SPLIT_SHAPE = (1, 12, 3, 6, 6)  # 27 tokens: Ulysses 2 pads the second shard with one token
SPLIT_STEPS = (999.0, 950.0)


def _split_inputs():
    out = []
    for i, step in enumerate(SPLIT_STEPS):
        x, t, per, dense, _ = case(SPLIT_SHAPE, [step], seed=10 + i)
        out.append((x, t, per, dense))
    g = torch.Generator().manual_seed(20)
    return out, [torch.randn(7, CFG.text_dim, generator=g)], [torch.randn(4, CFG.text_dim, generator=g)]


def _split_reference(plain) -> dict[str, list[torch.Tensor]]:
    """What each case of ``_split_worker`` must give, from one process."""
    from wanfast.pipeline import guided_prediction

    calls, ctx, null = _split_inputs()
    ref = {
        "t": [plain(x, t, ctx) for x, t, _, _ in calls],
        "dense": [plain(x, d, ctx) for x, _, _, d in calls],
    }
    ref["compiled"] = ref["dense"]
    dit = copy.deepcopy(plain)
    cache = StepCache(1e9, {"cond": ctx})
    with installed({"e": dit}, cache):
        ref["stepcache"] = [dit(x, per, ctx) for x, _, per, _ in calls]
    ref["cfg"] = [guided_prediction(plain, x, d, ctx, null, 4.0) for x, _, _, d in calls]
    return ref


def _split_worker(rank: int, port: int, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from wanfast.parallel.cfg import ParallelRuntime
        from wanfast.parallel.dist import Mesh
        from wanfast.parallel.ulysses import apply_ulysses

        group = dist.group.WORLD
        calls, ctx, null = _split_inputs()
        res, seen = {}, []
        with torch.no_grad():
            dit = random_model()
            apply_ulysses(dit, group)
            dit.head.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))  # tokens here
            res["t"] = [dit(x, t, ctx) for x, t, _, _ in calls]
            res["dense"] = [dit(x, d, ctx) for x, _, _, d in calls]
            fast = optimized(random_model())  # caches and compiled blocks, then the Ulysses plan
            apply_ulysses(fast, group)
            res["compiled"] = [fast(x, per, ctx) for x, _, per, _ in calls]
            dit = random_model()
            apply_ulysses(dit, group)
            cache = StepCache(1e9, {"cond": ctx}, group=group)
            with installed({"e": dit}, cache):
                res["stepcache"] = [dit(x, per, ctx) for x, _, per, _ in calls]
            res["decisions"] = [d.computed for d in cache.decisions]
            mesh = Mesh(rank=rank, cfg=2, ulysses=1, sp_group=None, cfg_group=group, world_group=None)
            runtime = ParallelRuntime(mesh, torch.float32)
            res["cfg"] = [runtime.predict(random_model(), x, d, ctx, null, 4.0) for x, _, _, d in calls]
        res["seen"] = seen
        torch.save(res, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@torch.no_grad()
def test_ulysses_and_cfg_parallel_per_token(plain, tmp_path):
    ref = _split_reference(plain)
    mp.spawn(_split_worker, args=(_free_port(), tmp_path), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["seen"] == [14] * 4  # ceil(27 / 2) tokens reach the head on each rank
        assert got["decisions"] == [True, False]  # both ranks skip alike (the sums are all-reduced)
        for name in ("t", "dense", "compiled", "stepcache", "cfg"):
            for a, b in zip(got[name], ref[name], strict=True):
                err = rel_err(a, b)
                assert err <= 1e-5, f"{name} rank {rank}: rel err {err:.2e}"
    assert rel_err(ref["dense"][0], ref["t"][0]) > 1e-2  # the per-token cases differ from the [B] one
