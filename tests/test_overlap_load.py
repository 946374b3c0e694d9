"""The low-noise expert loading while the high-noise expert runs the first steps (issue #17 part 3):
``wanfast.experts.Experts``, ``builder.overlap_rule`` and a build with the overlap against one without."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

import wanfast.builder as builder
from wanfast import timeline
from wanfast.builder import build, build_pipeline, overlap_rule, plan
from wanfast.config import EngineSettings
from wanfast.experts import Experts
from wanfast.loading.checkpoint import CheckpointError
from wanfast.memory import GiB, overlap_load_peak
from wanfast.specs import SPECS

CPU = EngineSettings(device="cpu", dtype=torch.float32)
SIZES = [(64, 48, 5)]


def test_reading_a_deferred_entry_starts_and_waits_for_it(monkeypatch):
    """A deferred entry keeps its place in the order; ``ready``, ``loading`` and iteration start nothing;
    ``start_loading`` starts it once; reading it waits for the load (recorded as a
    ``wait_expert_<name>`` span) and keeps the module."""
    gate, starts = threading.Event(), []
    with ThreadPoolExecutor(1) as pool:

        def start() -> Future:
            starts.append(1)
            return pool.submit(lambda: gate.wait(30) and "L")

        experts = Experts({"high_noise": "H"})
        experts.defer("low_noise", start)
        assert list(experts) == ["high_noise", "low_noise"] and len(experts) == 2
        assert experts.loading() == ("low_noise",) and experts.ready() == {"high_noise": "H"}
        assert "low_noise (loading)" in repr(experts) and starts == []
        experts.start_loading()
        experts.start_loading()
        assert starts == [1]
        monkeypatch.setattr(timeline, "ACTIVE", timeline.Timeline())
        threading.Timer(0.2, gate.set).start()
        assert experts["low_noise"] == "L"
    wait = timeline.ACTIVE.spans["wait_expert_low_noise"]
    assert wait["s"] >= 0.1 and wait["thread"] == threading.current_thread().name
    assert experts.loading() == () and dict(experts) == {"high_noise": "H", "low_noise": "L"}
    later: Future = Future()
    later.set_result("L2")
    experts.defer("low_noise", lambda: later)
    assert experts["low_noise"] == "L2" and experts.loading() == ()  # read first: started by the read


def test_a_failed_load_raises_where_the_expert_is_needed():
    future: Future = Future()
    future.set_exception(CheckpointError("low_noise_model: truncated safetensors file"))
    experts = Experts({"high_noise": "H"})
    experts.defer("low_noise", lambda: future)
    assert experts.ready() == {"high_noise": "H"}  # the steps before the boundary are not held up
    with pytest.raises(CheckpointError, match="truncated"):
        experts["low_noise"]
    with pytest.raises(CheckpointError, match="truncated"):  # and again on every read: never a half module
        experts["low_noise"]
    experts["low_noise"] = "L"  # replaced: no longer loading
    assert experts["low_noise"] == "L" and experts.loading() == ()


def test_the_low_noise_expert_loads_after_the_first_step(tiny_official, monkeypatch):
    """The build returns without reading the low-noise expert; its read starts once the first step has
    run, beside the next high-noise step, and the boundary step waits for it. It gets the same accel as the
    other (fused QKV) and the video is bit-identical to the build without the overlap."""
    reference = build_pipeline(tiny_official, replace(CPU, overlap_load=False))
    assert reference.experts.loading() == ()
    want = reference.generate("a cat", steps=3, frames=5)

    events, real = [], builder._load_expert

    def recorded(name, path, device, s):
        if name == "low_noise":
            events.append("low_noise read")
        return real(name, path, device, s)

    monkeypatch.setattr(builder, "_load_expert", recorded)
    p = plan(tiny_official, CPU)
    assert p.overlap_load
    pipe = build(p)
    assert pipe.experts.loading() == ("low_noise",) and events == []
    got = pipe.generate(
        "a cat", steps=3, frames=5, progress=lambda i, n, name: events.append(f"step {i} {name}")
    )
    assert events in (
        ["step 0 high_noise", "low_noise read", "step 1 high_noise", "step 2 low_noise"],
        ["step 0 high_noise", "step 1 high_noise", "low_noise read", "step 2 low_noise"],
    )
    assert torch.equal(got.latents, want.latents) and torch.equal(got.frames, want.frames)
    assert got.forwards == want.forwards
    low = pipe.experts["low_noise"]
    assert hasattr(low.blocks[0].self_attn, "wqkv")  # accel (fusion) ran in the loader
    a, b = low.state_dict(), reference.experts["low_noise"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = pipe.generate("a cat", steps=3, frames=5)  # a second request: nothing deferred is left
    assert torch.equal(again.latents, want.latents) and events.count("low_noise read") == 1


def test_a_failing_low_noise_load_fails_the_request_at_the_boundary(tiny_official, monkeypatch):
    real = builder._load_expert

    def broken(name, path, device, s):
        if name == "low_noise":
            raise CheckpointError(f"{path}: truncated safetensors file")
        return real(name, path, device, s)

    monkeypatch.setattr(builder, "_load_expert", broken)
    pipe = build_pipeline(tiny_official, CPU)
    steps = []
    with pytest.raises(CheckpointError, match="truncated"):
        pipe.generate("a cat", steps=3, frames=5, progress=lambda i, n, name: steps.append(name))
    assert steps == ["high_noise", "high_noise"]


def test_overlap_rule():
    """On by default for a two-expert checkpoint, resident and unsplit; off by its switch, for a one-DiT
    model, a tiny model (its files are gone after the build), a memory mode or a split; with a bf16
    checkpoint quantised on load, only when its bf16 expert fits beside the activations."""
    spec, s = SPECS["tiny"], CPU.resolved()
    assert overlap_rule(s, spec, SIZES, False, True)
    assert not overlap_rule(replace(s, overlap_load=False), spec, SIZES, False, True)
    assert not overlap_rule(s, SPECS["tiny-ti2v"], SIZES, False, True)
    assert not overlap_rule(s, spec, SIZES, False, False)
    for other in (dict(offload="expert"), dict(offload="blocks"), dict(cfg_parallel=True), dict(ulysses=2)):
        assert not overlap_rule(replace(s, **other), spec, SIZES, False, True), other
    assert overlap_load_peak(s, spec, SIZES, False) is None  # nothing quantised on load: no extra bytes
    q = replace(s, quant="fp8", memory_budget_gb=1000.0)
    peak, room = overlap_load_peak(q, spec, SIZES, False)
    assert room == 1000 * GiB and peak > 0
    assert overlap_load_peak(q, spec, SIZES, True) is None  # an FP8 checkpoint loads as it runs
    tight, roomy = (replace(q, memory_budget_gb=(peak + d) / GiB) for d in (-1024, 1024))
    assert not overlap_rule(tight, spec, SIZES, False, True) and overlap_rule(roomy, spec, SIZES, False, True)
    assert overlap_rule(tight, spec, SIZES, True, True)
    assert not plan("tiny", CPU).overlap_load  # a spec name: a tiny model written for the build


def test_no_overlap_load_flag():
    from wanfast.cli import build_parser, engine_settings

    def parse(*flags):
        return engine_settings(
            build_parser().parse_args(["generate", "--model", "tiny", "--prompt", "x", *flags])
        )

    assert parse().overlap_load and not parse("--no-overlap-load").overlap_load
    assert EngineSettings.from_json(parse("--no-overlap-load").to_json()).overlap_load is False  # to workers


def test_the_expert_loaded_meanwhile_runs_the_graphs_already_compiled(tiny_official, monkeypatch):
    """Compile on: the first step traces the block graphs before the low-noise expert is loaded and
    optimised; its steps run those graphs, nothing recompiles (``error_on_recompile`` from the end of the
    first step on) and the latents equal those of the build without the overlap."""
    import wanfast.accel as accel

    real_compile = accel.compile_blocks
    monkeypatch.setattr(  # Dynamo's guards and recompiles as inductor's, without its code generation
        accel,
        "compile_blocks",
        lambda dit, backend="inductor", mode=None: real_compile(dit, "aot_eager", mode),
    )
    s = replace(CPU, compile=True, self_attention_backend="sdpa-math")
    torch._dynamo.reset()
    want = build_pipeline(tiny_official, replace(s, overlap_load=False)).generate("a cat", steps=3, frames=5)

    torch._dynamo.reset()

    def progress(i: int, n: int, name: str) -> None:  # called before the deferred load starts
        monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)

    pipe = build_pipeline(tiny_official, s)
    assert pipe.experts.loading() == ("low_noise",)
    got = pipe.generate("a cat", steps=3, frames=5, progress=progress)
    assert got.steps_per_expert == {"high_noise": 2, "low_noise": 1}
    assert torch.equal(got.latents, want.latents)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: the loader's own stream and FP8 GEMMs")
def test_on_cuda_the_expert_quantised_on_its_own_stream_gives_the_same_video(tiny_official, monkeypatch):
    """On the GPU, bf16 with FP8 linears and compile: the low-noise expert is read, quantised and
    optimised on the loader's stream while the second step runs on the default one; the video is
    bit-identical to the build without the overlap."""
    s = EngineSettings(device="cuda", quant="fp8", compile=True)
    want = build_pipeline(tiny_official, replace(s, overlap_load=False)).generate("a cat", steps=3, frames=5)
    pipe = build_pipeline(tiny_official, s)
    assert pipe.experts.loading() == ("low_noise",)
    got = pipe.generate("a cat", steps=3, frames=5)
    assert torch.equal(got.latents, want.latents) and torch.equal(got.frames, want.frames)
