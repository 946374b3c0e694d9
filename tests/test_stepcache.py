"""Step caching (wanfast.accel.stepcache) on the tiny model, CPU: threshold 0 is the plain path exactly, the
forced steps and the counts, the error at a moderate threshold, separate branch residuals, per-request
state, the optimised settings, block offload, guidance truncation, and Ulysses / CFG-parallel with gloo.

12 steps at the tiny defaults (shift 5, boundary 0.875): timesteps 999 .. 908 on the high-noise expert
(5 steps), 833 .. 97 on the low-noise one (7). Block 0's modulated input depends on x and t only, so the
cond and uncond branches accumulate the same rel (measured per step: 0.060, 0.035, 0.048, 0.054 on the
high-noise expert); their residuals differ.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import rel_err

from wanfast.accel.graphs import CUDAGraphDiT
from wanfast.accel.stepcache import StepCache, installed
from wanfast.api import load_pipeline
from wanfast.config import ConfigError, EngineSettings
from wanfast.models.dit import WanDiT
from wanfast.specs import SPECS
from wanfast.tools.testing import write_official_checkpoint

PROMPT, GEN = "a cat", dict(size=(64, 48), steps=12, seed=3)
STEPS, HIGH_STEPS = 12, 5
MODERATE = 0.1  # skips 12 of 24 forwards here; final latents 4.6e-3 relative from the uncached ones
MODERATE_ERR = 0.02  # asserted bound (4x margin)
HUGE = 1e9  # everything but the forced forwards is skipped


def _settings(**kw) -> EngineSettings:
    return EngineSettings(device="cpu", dtype=torch.float32, vae_dtype=torch.float32, **kw)


def _pipe(folder: Path, settings: EngineSettings):
    pipe = load_pipeline(folder, settings=settings)
    pass  # the spec comes from the checkpoint
    return pipe


def _recording(pipe) -> list[StepCache]:
    """Keep each request's StepCache (the pipeline builds one per request) for inspection."""
    caches, build = [], pipe.step_cache

    def step_cache(*args):
        cache = build(*args)
        caches.append(cache)
        return cache

    pipe.step_cache = step_cache
    return caches


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_official_checkpoint(tmp_path_factory.mktemp("tiny"), SPECS["tiny"], seed=0)


@pytest.fixture(scope="module")
def plain(folder):
    return _pipe(folder, _settings().plain())


@pytest.fixture(scope="module")
def uncached(plain):
    return plain.generate(PROMPT, **GEN)


def test_threshold_zero_is_the_plain_path_exactly(plain, uncached):
    caches = _recording(plain)
    off = plain.generate(PROMPT, step_cache_threshold=0.0, **GEN)
    assert caches == [None]  # nothing installed
    assert torch.equal(off.latents, uncached.latents)
    assert off.forwards == uncached.forwards == {
        "computed": 24, "skipped": 0, "high_noise_computed": 10, "high_noise_skipped": 0,
        "low_noise_computed": 14, "low_noise_skipped": 0,
    }  # fmt: skip
    # installed but never skipping: the cached forward's compute path is the plain forward, bit for bit
    tiny = plain.generate(PROMPT, step_cache_threshold=1e-12, **GEN)
    assert torch.equal(tiny.latents, uncached.latents) and tiny.forwards["skipped"] == 0
    assert all("forward" not in d.__dict__ for d in plain.experts.values())  # removed after the request


def test_huge_threshold_computes_only_the_forced_steps(plain):
    caches = _recording(plain)
    res = plain.generate(PROMPT, step_cache_threshold=HUGE, **GEN)
    (cache,) = caches
    # per branch: the first call of each expert and the final step (on the low-noise expert)
    assert cache.counts == {
        ("high_noise", "cond"): [1, HIGH_STEPS - 1], ("high_noise", "uncond"): [1, HIGH_STEPS - 1],
        ("low_noise", "cond"): [2, STEPS - HIGH_STEPS - 2], ("low_noise", "uncond"): [2, STEPS - HIGH_STEPS - 2],
    }  # fmt: skip
    assert res.forwards["computed"] == 6 and res.forwards["skipped"] == 2 * STEPS - 6
    assert res.forwards["high_noise_computed"] + res.forwards["high_noise_skipped"] == 2 * HIGH_STEPS
    assert len(cache.decisions) == 2 * STEPS  # one decision per forward call
    assert [d.computed for d in cache.decisions[-2:]] == [True, True]  # the final timestep, forced
    assert torch.isfinite(res.latents).all()


def test_moderate_threshold_skips_some_and_stays_close(plain, uncached):
    res = plain.generate(PROMPT, step_cache_threshold=MODERATE, **GEN)
    assert 6 < res.forwards["computed"] < 2 * STEPS and res.forwards["skipped"] > 0
    assert res.forwards["computed"] + res.forwards["skipped"] == 2 * STEPS
    err = rel_err(res.latents, uncached.latents)
    assert 0 < err < MODERATE_ERR, f"rel err {err:.2e}"  # measured 4.6e-3


def test_second_request_equals_the_first(plain):
    a = plain.generate(PROMPT, step_cache_threshold=MODERATE, **GEN)
    b = plain.generate(PROMPT, step_cache_threshold=MODERATE, **GEN)
    assert torch.equal(a.latents, b.latents) and a.forwards == b.forwards


def test_guidance_truncation_counts(plain):
    caches = _recording(plain)
    res = plain.generate(PROMPT, step_cache_threshold=HUGE, cfg_steps=3, **GEN)
    (cache,) = caches
    # uncond runs steps 0-2 only (all on the high-noise expert): first computed, two skipped
    assert cache.counts[("high_noise", "uncond")] == [1, 2] and ("low_noise", "uncond") not in cache.counts
    assert cache.counts[("low_noise", "cond")] == [2, STEPS - HIGH_STEPS - 2]
    assert res.forwards["computed"] + res.forwards["skipped"] == STEPS + 3


def test_branches_keep_separate_residuals(folder):
    """Two steps, cond then uncond each: the second pair is skipped, and each branch's skipped output is
    head(x0 + R) with *its own* residual R from step one, recomputed here by hand."""
    dit = _pipe(folder, _settings().plain()).experts["high_noise"]
    g = torch.Generator().manual_seed(0)
    cond, uncond = [torch.randn(5, 32, generator=g)], [torch.randn(7, 32, generator=g)]
    x1 = torch.randn(1, 16, 3, 6, 8, generator=g)
    x2, t1, t2 = x1 + 0.01 * torch.randn(x1.shape, generator=g), torch.tensor([999.0]), torch.tensor([990.0])
    cache = StepCache(HUGE, {"cond": cond, "uncond": uncond})
    with torch.inference_mode():
        with installed({"high_noise": dit}, cache):
            first = {"cond": dit(x1, t1, cond), "uncond": dit(x1, t1, uncond)}
            second = {"cond": dit(x2, t2, cond), "uncond": dit(x2, t2, uncond)}
        assert [d.computed for d in cache.decisions] == [True, True, False, False]
        assert torch.equal(first["cond"], dit(x1, t1, cond))  # computed forwards are the plain ones

        def embed(x, t):
            x0 = dit.patch_embedding(x).flatten(2).transpose(1, 2)
            return x0, *dit.time_embed(t)

        def residual(ctx):  # stream after the last block - stream after the patch embedding, step one
            x0, _, e0 = embed(x1, t1)
            h, c, rope = x0, dit.embed_text(ctx, x1.device), dit.rope((3, 3, 4), x1.device)
            for block in dit.blocks:
                h = block(h, e0, c, rope)
            return h - x0

        x0, e, _ = embed(x2, t2)
        expect = {b: dit.unpatchify(dit.head(x0 + residual(c), e), (3, 3, 4)) for b, c in
                  (("cond", cond), ("uncond", uncond))}  # fmt: skip
    for b, other in (("cond", "uncond"), ("uncond", "cond")):
        assert rel_err(second[b], expect[b]) < 1e-6
        assert rel_err(second[b], expect[other]) > 1e-2  # the other branch's residual would show


def test_optimised_settings_and_block_offload(folder, plain):
    """Fused projections + cross-K/V/time/RoPE caches (compile is off on CPU), and block offload: the same
    decisions as the plain model and the same latents (offload: bit for bit)."""
    ref_caches = _recording(plain)
    ref = plain.generate(PROMPT, step_cache_threshold=MODERATE, **GEN)
    runs = {}
    for name, settings in (("optimised", _settings()), ("offload", _settings(offload="blocks"))):
        pipe = _pipe(folder, settings)
        caches = _recording(pipe)
        runs[name] = pipe.generate(PROMPT, step_cache_threshold=MODERATE, **GEN)
        assert [d.computed for d in caches[0].decisions] == [d.computed for d in ref_caches[0].decisions]
        assert runs[name].forwards == ref.forwards and ref.forwards["skipped"] > 0
    assert rel_err(runs["optimised"].latents, ref.latents) <= 1e-5
    assert torch.equal(runs["offload"].latents, runs["optimised"].latents)


def test_fp8(folder):
    """FP8 block linears (emulated on the CPU, slow: 4 steps): never skipping is the uncached FP8 path bit
    for bit; with the huge threshold, the forced forwards only."""
    pipe, gen = _pipe(folder, _settings(quant="fp8")), dict(GEN, steps=4)  # 2 steps per expert
    ref = pipe.generate(PROMPT, **gen)
    assert torch.equal(pipe.generate(PROMPT, step_cache_threshold=1e-12, **gen).latents, ref.latents)
    res = pipe.generate(PROMPT, step_cache_threshold=HUGE, **gen)
    assert res.forwards["computed"] == 6 and res.forwards["skipped"] == 2  # high-noise step 2, each branch


def test_cuda_graphs_are_refused(folder):
    dit = _pipe(folder, _settings().plain()).experts["high_noise"]
    graphed = CUDAGraphDiT(dit, capture=lambda fn: (fn(), lambda: None))
    with (
        pytest.raises(ConfigError, match="cuda_graphs"),
        installed({"high_noise": graphed}, StepCache(1.0, {})),
    ):
        pass
    assert isinstance(dit, WanDiT) and "forward" not in dit.__dict__


# --- split runs (gloo, 2 processes) --------------------------------------------------------------------

SPLIT = dict(
    size=(48, 48), steps=12, seed=3
)  # 27 tokens: Ulysses 2 pads the second shard with one zero token
SPLIT_CASES = [("u2", dict(ulysses=2)), ("cfg2", dict(cfg_parallel=True))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, folder: Path, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for name, kw in SPLIT_CASES:
            pipe = _pipe(folder, _settings(**kw))
            caches = _recording(pipe)
            res = pipe.generate(PROMPT, step_cache_threshold=MODERATE, **SPLIT)
            decisions = [(d.expert, d.branch, d.computed, d.acc) for d in caches[0].decisions]
            torch.save({"latents": res.latents, "decisions": decisions}, out / f"{name}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_split_runs_decide_alike_and_match_one_process(folder, tmp_path):
    pipe = _pipe(folder, _settings())
    caches = _recording(pipe)
    ref = pipe.generate(PROMPT, step_cache_threshold=MODERATE, **SPLIT)
    single = [(d.expert, d.branch, d.computed, d.acc) for d in caches[0].decisions]
    assert 0 < ref.forwards["skipped"] < 2 * STEPS
    # no accumulated rel sits within 1e-3 of the threshold, so rounding cannot flip a decision
    assert min(abs(acc - MODERATE) for *_, acc in single) > 1e-3
    mp.spawn(_worker, args=(_free_port(), folder, tmp_path), nprocs=2, join=True)
    for name, _ in SPLIT_CASES:
        for rank in range(2):
            got = torch.load(tmp_path / f"{name}-{rank}.pt")
            # Ulysses: both ranks see both branches; CFG-parallel: rank r runs branch r alone
            want = single if name == "u2" else [d for d in single if d[1] == ("cond", "uncond")[rank]]
            assert [d[:3] for d in got["decisions"]] == [d[:3] for d in want], (name, rank)
            accs = torch.tensor([d[3] for d in got["decisions"]]), torch.tensor([d[3] for d in want])
            assert torch.allclose(*accs, rtol=1e-5, atol=1e-6), (name, rank)
            err = rel_err(got["latents"], ref.latents)
            assert err <= 1e-5, f"{name} rank {rank}: rel err {err:.2e}"
