"""Cold start (issue #17): ``--compile-cache`` reused by a second process, ``generate --timings``, the text
encoder loading beside the experts, and benchmarks/coldstart_gpu.sh end to end on the tiny spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from wanfast import timeline
from wanfast.accel.compile_cache import CompileCache, model_key, size_name
from wanfast.builder import build_pipeline
from wanfast.config import EngineSettings

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

# A child process: the tiny pipeline compiled with inductor (CPU), one generation, its latents saved; prints
# the compile counters and compile time of this process as JSON on its last line.
CHILD = textwrap.dedent("""
    import json, sys
    import torch
    from wanfast.builder import build_pipeline
    from wanfast.config import EngineSettings
    from wanfast.timeline import compile_report
    cache = sys.argv[1] if sys.argv[1] != "-" else None
    s = EngineSettings(device="cpu", dtype=torch.float32, compile=True, compile_cache=cache)
    pipe = build_pipeline("tiny", s)
    r = pipe.generate("a cat", steps=2, frames=5)
    torch.save(r.latents, sys.argv[2])
    print(json.dumps(compile_report() | {"has_cache": pipe.compile_cache is not None}))
""")


def _child(cache: str, latents: Path, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, cache, str(latents)], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_second_process_with_the_compile_cache_compiles_nothing(tmp_path):
    """Process 1 compiles (inductor, CPU) into DIR and writes the size's artifact file; process 2 with the
    same DIR takes every compiled graph from it (hits, no misses) and gives bit-identical latents; process
    3 gets only the artifact file copied into a new DIR (another machine) and hits as well."""
    env = dict(ENV, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "default_inductor"))  # not the user's cache
    cache = tmp_path / "cc"
    first = _child(str(cache), tmp_path / "a.pt", env)
    assert first["has_cache"] and first["fxgraph_cache_miss"] >= 1 and first["fxgraph_cache_hit"] == 0
    folders = list(cache.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("tiny_float32_nofp8_")
    artifact = folders[0] / "64x48x5.bin"  # one artifact set per model key and size
    assert artifact.is_file() and artifact.stat().st_size > 0
    second = _child(str(cache), tmp_path / "b.pt", env)
    assert second["fxgraph_cache_hit"] >= 1 and second["fxgraph_cache_miss"] == 0
    assert second["autograd_cache_miss"] == 0
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert torch.equal(a, b)  # the same compiled code: bit-identical
    moved = tmp_path / "moved" / folders[0].name
    moved.mkdir(parents=True)
    (moved / artifact.name).write_bytes(artifact.read_bytes())
    third = _child(str(tmp_path / "moved"), tmp_path / "c.pt", env)
    assert third["fxgraph_cache_hit"] >= 1 and third["fxgraph_cache_miss"] == 0
    assert torch.equal(a, torch.load(tmp_path / "c.pt"))


def test_compile_cache_off_switch_and_keys(tmp_path):
    """No flag: no cache object (today's behaviour); compile off: the flag has nothing to keep. The key
    separates what changes the traced graphs."""
    assert build_pipeline("tiny", EngineSettings(device="cpu", dtype=torch.float32)).compile_cache is None
    off = EngineSettings(device="cpu", dtype=torch.float32, compile=False, compile_cache=str(tmp_path))
    assert build_pipeline("tiny", off).compile_cache is None
    base = EngineSettings(device="cpu", dtype=torch.bfloat16)
    keys = {
        model_key("t2v-A14B", base),
        model_key("t2v-A14B", base, fp8_checkpoint=True),
        model_key("t2v-A14B", EngineSettings(device="cpu", dtype=torch.bfloat16, quant="fp8")),
        model_key("t2v-A14B", EngineSettings(device="cpu", dtype=torch.bfloat16, self_attention_backend="sdpa")),
        model_key("ti2v-5B", base),
        model_key("t2v-A14B", EngineSettings(device="cpu", dtype=torch.float32)),
    }  # fmt: skip
    assert len(keys) == 5  # FP8 by quant or by checkpoint is the same graph
    assert size_name((1280, 720, 81)) == "1280x720x81"
    cc = CompileCache(tmp_path, "k")
    assert cc.load([(64, 48, 5)]) == []  # no file yet: nothing loaded, no error
    (tmp_path / "k").mkdir()
    cc.path((64, 48, 5)).write_bytes(b"not an artifact file")
    assert cc.load([(64, 48, 5)]) == []  # unreadable: compile instead of failing


def test_text_encoder_loaded_beside_the_experts_is_the_same(tiny_official, monkeypatch):
    """WANFAST_LOAD_THREADS on (default) and off build bit-identical pipelines from a checkpoint."""
    s = EngineSettings(device="cpu", dtype=torch.float32)
    monkeypatch.setenv("WANFAST_LOAD_THREADS", "0")
    serial = build_pipeline(tiny_official, s)
    monkeypatch.setenv("WANFAST_LOAD_THREADS", "1")
    threaded = build_pipeline(tiny_official, s)
    for a, b in [(serial.text_encoder.model, threaded.text_encoder.model), (serial.vae, threaded.vae),
                 *((serial.experts[k], threaded.experts[k]) for k in serial.experts)]:  # fmt: skip
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ra, rb = serial.generate("a cat", steps=2, frames=5), threaded.generate("a cat", steps=2, frames=5)
    assert torch.equal(ra.latents, rb.latents)


def test_generate_timings_json(tmp_path, tiny_official):
    """A fresh `wanfast generate --timings`: every phase there, marks in time order, the phases inside
    the process's life, and the load spans' bytes those of the files."""
    out = tmp_path / "t.json"
    cmd = [sys.executable, "-m", "wanfast", "generate", "--ckpt-dir", str(tiny_official), "--prompt", "a cat",
           "--steps", "3", "--frames", "5", "--device", "cpu", "--no-progress", "--output",
           str(tmp_path / "v.mp4"), "--timings", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = json.loads(out.read_text())
    phases = t["phases"]
    for name in ("imports", "plan", "load_text_encoder", "load_expert_high_noise", "load_expert_low_noise",
                 "load_vae", "accel", "build", "text_encoding", "first_step", "vae_decode", "write_mp4"):  # fmt: skip
        assert name in phases and phases[name] >= 0, name
    marks = list(t["marks"].values())
    assert marks == sorted(marks) and list(t["marks"])[:3] == ["imports", "planned", "built"]
    assert list(t["marks"])[-1] == "mp4" and t["to_mp4_s"] == t["marks"]["mp4"]
    assert 0 < t["marks"]["imports"] < t["to_first_step_s"] < t["to_mp4_s"]
    # the spans lie inside the build; the serial parts of the run add up to no more than the process life
    for name in ("load_expert_high_noise", "load_text_encoder", "load_vae", "accel"):
        span = t["spans"][name]
        assert t["marks"]["planned"] <= span["start"] <= span["end"] <= t["marks"]["built"] + 1e-3, name
    # the low-noise expert loads (and is optimised) after the first step, beside the second: done by the end
    # of its own first step
    low, low_accel = t["spans"]["load_expert_low_noise"], t["spans"]["accel_low_noise"]
    assert t["overlap_load"] and t["marks"]["built"] <= t["steps"][0]["end"] <= low["start"]
    assert low["end"] <= low_accel["start"] <= low_accel["end"] <= t["steps"][2]["end"]
    assert low["thread"] == low_accel["thread"] == "wanfast-low_noise_0"
    serial = ("imports", "plan", "build", "text_encoding", "vae_decode", "write_mp4")
    assert sum(phases[n] for n in serial) + sum(s["s"] for s in t["steps"]) <= t["to_mp4_s"] + 1e-3
    assert [s["expert"] for s in t["steps"]] == ["high_noise", "high_noise", "low_noise"]
    expert_bytes = sum(f.stat().st_size for f in (tiny_official / "high_noise_model").iterdir())
    assert t["spans"]["load_expert_high_noise"]["bytes"] == expert_bytes
    assert t["model"] == "tiny" and t["params"]["frames"] == 5 and "fxgraph_cache_hit" in t["compile"]


def test_coldstart_script_runs_every_stage_on_the_tiny_spec(tmp_path):
    """benchmarks/coldstart_gpu.sh all with SPEC=tiny on the CPU: the checkpoints it writes load through
    the normal loaders (FP8 set, then one bf16 expert read twice), every generate run writes its timings,
    and the summary states each load beside the dd rate."""
    w = tmp_path
    env = dict(ENV, OUT=str(w / "out"), CKPT=str(w / "ckpt"), COMPILE_CACHE=str(w / "cc"), VIDEOS=str(w / "v"),
               SPEC="tiny", DEVICE="cpu", DROP="0", H2D_GIB="0.01", GEN="--size 64x48 --frames 5 --steps 2",
               GEN_BF16="--size 64x48 --frames 5 --steps 2 --no-compile",
               FP8_RUNS="cold_compile warm_cached cold_cached warm_serial warm_staged cold_staged warm_mapped "
               "warm_cached_nooverlap", SERVE_RUNS="cached nocache cached", WARM_SIZES="64x48x5", SERVE_ENGINE="",
               BF16_RUNS="cold warm cold_staged cold_mapped cold_nooverlap")  # fmt: skip
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "coldstart_gpu.sh"), "all", "test"],
                          capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    o = w / "out" / "coldstart"
    runs = ["fp8_cold_compile", "fp8_warm_cached", "fp8_cold_cached", "fp8_warm_serial", "fp8_warm_staged",
            "fp8_cold_staged", "fp8_warm_mapped", "fp8_warm_cached_nooverlap", "bf16_cold", "bf16_warm",
            "bf16_cold_staged", "bf16_cold_mapped", "bf16_cold_nooverlap"]  # fmt: skip
    for name in runs:
        meta = json.loads((o / f"meta_{name}.json").read_text())
        assert meta["rc"] == 0 and meta["dropped"] == 0, (name, (o / f"gen_{name}.log").read_text()[-2000:])
    for run in ("cached", "nocache", "cached_2"):  # `wanfast serve` reached /health 200, its size warm; a
        # name given twice is written twice (NAME_2), not over the first
        serve = json.loads((o / f"serve_{run}.json").read_text())
        assert serve["ready_s"] > 0 and serve["health"]["status"] == "ok", (run, serve)
        assert serve["health"]["workers"][0]["warm_sizes"] == ["64x48x5"]
        assert ("--compile-cache" in serve["cmd"]) == run.startswith("cached")
    summary = json.loads((o / "summary.json").read_text())
    assert set(summary["runs"]) == {f"gen_{n}.json" for n in runs}
    fp8 = summary["runs"]["gen_fp8_warm_cached.json"]["loads"]
    assert set(fp8) == {"load_expert_high_noise", "load_expert_low_noise", "load_text_encoder", "load_vae"}
    for name in runs:  # each switch reached its process, and only its own
        t = json.loads((o / f"gen_{name}.json").read_text())
        assert (t["load_threads"], t["staged_load"]) == ("serial" not in name, "staged" in name), name
        assert t["overlap_load"] == ("nooverlap" not in name) == t["settings"]["overlap_load"], name
        assert t["settings"]["compile_cache"] == (None if name.startswith("bf16") else str(w / "cc")), name
    # the overlap changes when the low-noise expert loads, not what the video is
    metas = {n: json.loads((o / f"meta_{n}.json").read_text()) for n in runs}
    assert len(metas["fp8_warm_cached"]["mp4_md5"]) == 32
    assert metas["fp8_warm_cached"]["mp4_md5"] == metas["fp8_warm_cached_nooverlap"]["mp4_md5"]
    assert metas["bf16_cold"]["mp4_md5"] == metas["bf16_cold_nooverlap"]["mp4_md5"]
    # the bf16 set: one expert folder, the low-noise one a link to it (same bytes read twice)
    bf16 = summary["runs"]["gen_bf16_cold.json"]["loads"]
    assert bf16["load_expert_high_noise"]["bytes"] == bf16["load_expert_low_noise"]["bytes"] > 0
    assert bf16["load_expert_high_noise"]["vs_dd_time"] > 0 and "vs_dd_time" in fp8["load_expert_high_noise"]
    assert (w / "ckpt" / "low_noise_model").is_symlink()
    assert summary["dd_GB_per_s"]["dd_fp8_cold.json"] > 0 and summary["parts"]["h2d.json"]["pinned"]["s"] > 0
    dd = summary["parts"]["dd_bf16_cold.json"]
    assert {Path(f["file"]).parent.name for f in dd["files"]} == {"high_noise_model"} and dd["bytes"] > 0


def test_staged_reads_equal_mapped_reads(tiny_official, tmp_path):
    """``read_staged`` gives the mapped reader's tensors bit for bit (keys, dtypes, shapes, bytes): the tiny
    official fp32 shards, an FP8 expert (e4m3 + fp32 scales) and a bf16 file, with the staging buffer
    larger than a shard, and small enough that runs split and single tensors exceed it."""
    from safetensors.torch import save_file

    from wanfast.loading.checkpoint import read_safetensors, read_staged, safetensors_files
    from wanfast.tools.quantize import quantize_expert

    quantize_expert(tiny_official / "high_noise_model", tmp_path / "fp8")
    mixed = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(7), "c": torch.tensor(2.5), "d": torch.ones(0),
             "e": torch.tensor([True, False])}  # fmt: skip
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    sets = [safetensors_files(tiny_official / "high_noise_model", "diffusion_pytorch_model"),
            safetensors_files(tmp_path / "fp8", "diffusion_pytorch_model"), [tmp_path / "mixed.safetensors"]]  # fmt: skip
    for files in sets:
        ref = read_safetensors(files)
        for stage_bytes, readers in ((1 << 30, 1), (4096, 3), (97, 8)):  # one range; ranges split tensors
            got = read_staged(files, "cpu", stage_bytes, readers)
            assert got.keys() == ref.keys()
            for k, t in ref.items():
                assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
                assert (
                    torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)) if t.dim() else got[k] == t
                ), k


def test_staged_load_builds_the_same_pipeline(tiny_official, tiny_diffusers, tmp_path, monkeypatch):
    """WANFAST_STAGED_LOAD=1 builds bit-identical experts: fp32 files cast to bf16 (official and Diffusers
    layouts: the Diffusers keys renamed after the read), and an FP8 checkpoint (its q/k/v concatenated
    after the read)."""
    from wanfast.tools.quantize import quantize_checkpoint

    quantize_checkpoint(tiny_official, tmp_path / "fp8")
    s = EngineSettings(device="cpu", dtype=torch.bfloat16)
    for source in (tiny_official, tiny_diffusers, tmp_path / "fp8"):
        monkeypatch.setenv("WANFAST_STAGED_LOAD", "0")
        mapped = build_pipeline(source, s)
        monkeypatch.setenv("WANFAST_STAGED_LOAD", "1")
        staged = build_pipeline(source, s)
        for name in mapped.experts:
            a, b = mapped.experts[name].state_dict(), staged.experts[name].state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (source, name)


def test_staged_load_default_rule(tiny_official, tmp_path, monkeypatch):
    """Staged reads by default for CUDA only, and not for files with more float32/64 than the limit (they
    would sit on the GPU whole before the cast); WANFAST_STAGED_LOAD=0/1 overrides either way."""
    from safetensors.torch import save_file

    import wanfast.loading.checkpoint as ck

    save_file(
        {"w": torch.zeros(64, dtype=torch.bfloat16), "s": torch.zeros(4)}, str(tmp_path / "b.safetensors")
    )
    bf16 = [tmp_path / "b.safetensors"]  # 16 bytes of float32 scales
    fp32 = ck.safetensors_files(tiny_official / "high_noise_model", "diffusion_pytorch_model")
    monkeypatch.delenv("WANFAST_STAGED_LOAD", raising=False)
    monkeypatch.setattr(ck, "WIDE_STAGE_LIMIT", 1024)
    assert sum(f.stat().st_size for f in fp32) > 4096  # the tiny model's shards are float32, over the limit
    assert ck.staged_load_enabled("cuda", bf16) and ck.staged_load_enabled("cuda:1", None)
    assert not ck.staged_load_enabled("cuda", fp32) and not ck.staged_load_enabled("cpu", bf16)
    monkeypatch.setenv("WANFAST_STAGED_LOAD", "1")
    assert ck.staged_load_enabled("cpu", fp32) and ck.staged_load_enabled("cuda", fp32)
    monkeypatch.setenv("WANFAST_STAGED_LOAD", "0")
    assert not ck.staged_load_enabled("cuda", bf16)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA: the pinned-buffer path (run on the GPU machine)"
)
def test_staged_reads_on_cuda_equal_mapped_reads(tiny_official, tmp_path):
    """The CUDA branch of ``read_staged`` (two pinned buffers per reader, copies on the readers' streams)
    gives the mapped reader's bytes, with ranges that split tensors and more readers than ranges."""
    from wanfast.loading.checkpoint import read_safetensors, read_staged, safetensors_files

    files = safetensors_files(tiny_official / "high_noise_model", "diffusion_pytorch_model")
    ref = read_safetensors(files)
    for stage_bytes, readers in ((1 << 30, 1), (4096, 3), (97, 8)):
        got = read_staged(files, "cuda", stage_bytes, readers)
        assert got.keys() == ref.keys()
        for k, t in ref.items():
            assert got[k].device.type == "cuda" and got[k].dtype == t.dtype and got[k].shape == t.shape, k
            assert torch.equal(got[k].cpu().reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k


def test_load_module_consumes_its_state_dict():
    """``load_module`` pops each source tensor as it casts it (a staged read's GPU copy is freed tensor by
    tensor, not after the whole model is cast): the dict is empty after, the values cast exactly."""
    import weakref

    from wanfast.loading.checkpoint import load_module

    src = {"weight": torch.randn(4, 3, dtype=torch.bfloat16), "bias": torch.randn(4, dtype=torch.bfloat16)}
    want = {k: v.float() for k, v in src.items()}
    alive = weakref.ref(src["weight"])
    model = load_module(lambda: torch.nn.Linear(3, 4), src, "cpu", torch.float32, "a linear")
    assert src == {} and alive() is None  # the bf16 source is gone once its float32 copy exists
    assert all(torch.equal(model.state_dict()[k], v) and v.dtype == torch.float32 for k, v in want.items())


def test_staged_read_failure_falls_back_to_mapped_reads(tiny_official, monkeypatch, caplog):
    """A staged read that fails for a system reason (pinned memory refused) falls back to the mapped files
    with a warning when staged reads are only the default; with WANFAST_STAGED_LOAD=1 the error stands."""
    import wanfast.loading.checkpoint as ck

    def refuse(files, device):
        raise RuntimeError("cudaHostAlloc: out of memory")

    files = ck.safetensors_files(tiny_official / "high_noise_model", "diffusion_pytorch_model")
    monkeypatch.setattr(ck, "staged_load_enabled", lambda device, files=None: True)
    monkeypatch.setattr(ck, "read_staged", refuse)
    monkeypatch.delenv("WANFAST_STAGED_LOAD", raising=False)
    monkeypatch.setattr(timeline, "ACTIVE", timeline.Timeline())
    with caplog.at_level("WARNING", logger="wanfast.loading"), timeline.span("load_expert_high_noise"):
        got = ck.read_safetensors(files, "cuda")
    assert "staged reads failed (cudaHostAlloc" in caplog.text
    # the --timings report says what the loader did, not what the rule would have chosen
    assert timeline.ACTIVE.spans["load_expert_high_noise"]["read"] == "mapped (staged failed)"
    assert timeline._experts_staged(timeline.ACTIVE.spans) is False
    ref = dict(ck.iter_safetensors(files))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    monkeypatch.setenv("WANFAST_STAGED_LOAD", "1")
    with pytest.raises(RuntimeError, match="cudaHostAlloc"):
        ck.read_safetensors(files, "cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two CUDA devices (run on nvidia-h200-x2)")
def test_staged_reads_follow_the_current_device(tiny_official):
    """Under torchrun a rank's device is a bare 'cuda' with its current device set to LOCAL_RANK: the
    reader threads (whose current device starts at 0) must stage on that GPU, not on GPU 0, whose streams
    would not order the copies against the buffers' reuse."""
    from wanfast.loading.checkpoint import read_safetensors, read_staged, safetensors_files

    files = safetensors_files(tiny_official / "high_noise_model", "diffusion_pytorch_model")
    ref = read_safetensors(files)
    before = torch.cuda.current_device()
    try:
        torch.cuda.set_device(1)
        got = read_staged(files, "cuda", 97, 8)
        torch.cuda.synchronize(1)
    finally:
        torch.cuda.set_device(before)
    for k, t in ref.items():
        assert got[k].device == torch.device("cuda", 1), k
        assert torch.equal(got[k].cpu().reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k


def test_the_loader_records_how_it_read_in_its_span(tiny_official, monkeypatch):
    """``timeline.annotate`` lands in the innermost span open on the calling thread; reads with no device
    (a LoRA file) leave no note; with recording off nothing is kept."""
    import wanfast.loading.checkpoint as ck

    files = ck.safetensors_files(tiny_official / "high_noise_model", "diffusion_pytorch_model")
    monkeypatch.setattr(timeline, "ACTIVE", timeline.Timeline())
    monkeypatch.setenv("WANFAST_STAGED_LOAD", "1")  # staged on the CPU too
    with timeline.span("load_expert_high_noise"), timeline.span("inner"):
        ck.read_safetensors(files, "cpu")
    with timeline.span("load_expert_low_noise"):
        ck.read_safetensors(files)  # no device: no decision, no note
    spans = timeline.ACTIVE.spans
    assert spans["inner"]["read"] == "staged" and "read" not in spans["load_expert_high_noise"]
    assert "read" not in spans["load_expert_low_noise"]
    assert timeline._experts_staged(spans) is None, "an expert span without a recorded read: unknown"
    spans["load_expert_low_noise"]["read"] = spans["load_expert_high_noise"]["read"] = "staged"
    assert timeline._experts_staged(spans) is True
    monkeypatch.setattr(timeline, "ACTIVE", None)
    ck.read_safetensors(files, "cpu")  # recording off: annotate is a no-op
