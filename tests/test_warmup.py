"""``wanfast serve --warm-sizes``: workers run each size before /health says ready, and /health lists them."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from wanfast.config import ConfigError, EngineSettings
from wanfast.server.testing import ServerProcess
from wanfast.server.warmup import _overrides, parse_warm_sizes, read_warm, warm_up, write_warm
from wanfast.specs import SPECS, expert_for


def test_serve_is_ready_only_with_every_size_warm(tmp_path):
    """Two workers, two sizes: when /health first says ok, every worker lists both sizes, in order, and
    the log shows each worker's warm-up generations."""
    args = ("--workers", "2", "--warm-sizes", "64x48x5,32x32x5")
    with ServerProcess(tmp_path / "srv", *args) as srv, srv.client() as c:
        health = c.get("/health").json()
        assert health["status"] == "ok" and len(health["workers"]) == 2
        for w in health["workers"]:
            assert w["state"] == "ready" and w["warm_sizes"] == ["64x48x5", "32x32x5"], w
        assert srv.log().count("warm: 64x48x5 in") == 2 and srv.log().count("warm: 32x32x5 in") == 2


def test_serve_without_warm_sizes_lists_none(tmp_path):
    with ServerProcess(tmp_path / "srv") as srv, srv.client() as c:
        assert [w["warm_sizes"] for w in c.get("/health").json()["workers"]] == [[]]


def test_bad_warm_size_refused_before_any_worker(tmp_path):
    code, out = ServerProcess(tmp_path / "srv", "--warm-sizes", "64x48x6").run_to_exit()
    assert code == 2 and "frames must be 4n+1" in out, out[-2000:]
    with pytest.raises(ConfigError, match="WIDTHxHEIGHTxFRAMES"):
        parse_warm_sizes("64x48", SPECS["tiny"])
    assert parse_warm_sizes(" 64x48x5 ,32x32x9", SPECS["tiny"]) == [(64, 48, 5), (32, 32, 9)]


def test_warm_file_counts_only_for_its_process(tmp_path):
    write_warm(tmp_path, "w0", [{"size": "64x48x5", "seconds": 1.0}], pid=os.getpid())
    assert read_warm(tmp_path, "w0", os.getpid()) == ["64x48x5"]
    assert read_warm(tmp_path, "w0", os.getpid() + 1) == []  # a later process in the slot: not warm yet
    assert read_warm(tmp_path, "w1", os.getpid()) == [] and read_warm(tmp_path, "w0", None) == []


def test_warm_up_runs_each_expert_once():
    """The two warm-up steps of a two-expert model: the first on the high-noise expert, the second on the
    low-noise one (both experts' first calls happen before a request)."""
    from wanfast.solvers import make_solver

    for name in ("tiny", "t2v-A14B", "i2v-A14B"):
        spec = SPECS[name]
        over = _overrides(SimpleNamespace(spec=spec, settings=EngineSettings()), (64, 48, 5))
        ts = make_solver(spec.defaults.solver, over["steps"], spec.defaults.shift).timesteps.tolist()
        assert [expert_for(spec.experts, t, over["boundary"]) for t in ts] == ["high_noise", "low_noise"]


def test_unguided_warm_up_compiles_what_a_guided_request_runs():
    """The warm-up runs one conditional pass per step (guidance 1; a CFG-parallel worker keeps the pair):
    a guided request of the same size afterwards compiles nothing (error_on_recompile), so halving the
    warm-up's DiT passes leaves no compile to the first request."""
    import torch

    from wanfast.builder import build_pipeline

    assert (
        _overrides(SimpleNamespace(spec=SPECS["tiny"], settings=EngineSettings()), (64, 48, 5))["guidance"]
        == 1
    )
    split = SimpleNamespace(spec=SPECS["tiny"], settings=EngineSettings(cfg_parallel=True))
    assert "guidance" not in _overrides(split, (64, 48, 5))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    pipe = build_pipeline("tiny", EngineSettings(device="cpu", compile=True))
    warm_up(pipe, [(64, 48, 5)])
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = pipe.generate("a guided request", size=(64, 48), frames=5, steps=3, guidance=5.0)
    assert counters["stats"]["unique_graphs"] == graphs
    assert out.forwards["computed"] == 6  # guided: two passes per step, all from the warmed graphs
