"""``generate --prompts-file``, ``--memory-budget`` (CLI, API, server), and the new engine flags."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import wanfast.builder
import wanfast.pipeline
from wanfast.accel.offload import MemoryBudgetError, estimate_memory, weight_sizes
from wanfast.api import load_pipeline
from wanfast.builder import open_model
from wanfast.cli import build_parser, engine_settings, main
from wanfast.config import EngineSettings
from wanfast.memory import GiB, plan_memory
from wanfast.server.cli import check_memory, worker_config
from wanfast.server.schemas import VideoRequest, validate_request
from wanfast.server.worker import worker_settings
from wanfast.specs import SPECS, resolve_params
from wanfast.tools.testing import write_official_checkpoint
from wanfast.video import read_mp4

SMALL = ["--size", "32x32", "--frames", "5", "--steps", "1", "--device", "cpu", "--dtype", "fp32"]


def write_lines(path, *entries) -> str:
    path.write_text("\n".join(e if isinstance(e, str) else json.dumps(e) for e in entries) + "\n")
    return str(path)


# --- prompts file ------------------------------------------------------------------------------------


def test_prompts_file_overrides_outputs_and_one_load(tmp_path, monkeypatch, capsys):
    loads = []
    real = wanfast.builder.build
    monkeypatch.setattr(wanfast.builder, "build", lambda *a, **k: loads.append(1) or real(*a, **k))
    dog = tmp_path / "sub" / "dog.mp4"
    (tmp_path / "sub").mkdir()
    prompts = write_lines(
        tmp_path / "p.jsonl",
        {"prompt": "a cat", "size": "32x32", "frames": 5, "seed": 1},
        "",  # blank lines are skipped, line numbers still count them
        {"prompt": "a dog", "steps": 2, "cfg_steps": 1, "negative_prompt": "", "output": str(dog)},
        {"prompt": "a fox", "width": 48, "height": 32, "fps": 8, "step_cache_threshold": 0.0},
    )
    out, lat = tmp_path / "v.mp4", tmp_path / "l.safetensors"
    argv = ["generate", "--model", "tiny", "--prompts-file", prompts, "--output", str(out)]
    assert main([*argv, "--save-latents", str(lat), "--steps", "3", "--seed", "7", "--no-progress"]) == 0
    assert loads == [1], "the model loads once for the whole file"
    expected = [  # (file, frames, height, width, fps); size/frames/fps from the line, else the tiny preset
        (tmp_path / "v_0.mp4", 5, 32, 32, 16),
        (dog, 9, 48, 64, 16),
        (tmp_path / "v_2.mp4", 9, 32, 48, 8),
    ]
    for path, f, h, w, fps in expected:
        frames, got_fps = read_mp4(path)
        assert frames.shape == (f, h, w, 3) and got_fps == fps, path
    assert not (tmp_path / "v_1.mp4").exists()
    latents = [load_file(tmp_path / f"l_{i}.safetensors")["latents"] for i in range(3)]
    assert [tuple(x.shape) for x in latents] == [(16, 2, 4, 4), (16, 3, 6, 8), (16, 3, 4, 6)]
    stdout = capsys.readouterr().out
    lines = [s for s in stdout.splitlines() if s.startswith("[")]
    assert len(lines) == 3 and "line 1" in lines[0] and "line 3" in lines[1] and "line 4" in lines[2]
    assert "3 steps, seed 1" in lines[0] and "2 steps, seed 7" in lines[1] and "3 steps, seed 7" in lines[2]
    assert "total: 3 prompts, 3 done, 0 failed" in stdout
    if hasattr(wanfast.pipeline.GenerationResult, "__dataclass_fields__") and (
        "forwards" in wanfast.pipeline.GenerationResult.__dataclass_fields__
    ):  # the step-cache count (pipeline.py): line 2 guides 1 of 2 steps -> 3 forwards, none skipped
        assert "DiT forwards 3 computed, 0 skipped" in lines[1]
    # line 1 is exactly the single-prompt run with the same values
    single = tmp_path / "single.safetensors"
    argv = ["generate", "--model", "tiny", "--prompt", "a cat", "--size", "32x32", "--frames", "5"]
    argv += [
        "--seed",
        "1",
        "--steps",
        "3",
        "--output",
        str(tmp_path / "s.mp4"),
        "--save-latents",
        str(single),
    ]
    assert main([*argv, "--no-progress"]) == 0
    assert torch.equal(load_file(single)["latents"], latents[0])


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "x", "frame": 5}, "line 2: unknown key\\(s\\) 'frame'"),
        ({"prompt": "x", "frames": 10}, "line 2: frames must be 4n\\+1"),
        ({"prompt": "x", "steps": "4"}, 'line 2: steps must be int, got "4"'),
        ({"prompt": "x", "shift": True}, "line 2: shift must be int/float, got true"),
        ({"prompt": "x", "size": "32x32", "width": 32}, "line 2: give size or width/height"),
        ({"prompt": "x", "size": "big"}, "line 2: size must be WIDTHxHEIGHT"),
        ({"prompt": "x", "cfg_steps": -1}, "line 2: cfg_steps must be an integer >= 0"),
        ({"prompt": "x", "step_cache_threshold": -0.1}, "line 2: step_cache_threshold must be >= 0"),
        ({"prompt": "x", "solver": "ddim"}, "line 2: unknown solver 'ddim'"),
        ({"steps": 3}, 'line 2: missing "prompt"'),
        ('{"prompt": "x",', "line 2: not valid JSON"),
        ('["x"]', "line 2: expected a JSON object"),
        ({"prompt": "x", "output": "dup.mp4"}, "line 2: output dup.mp4 is also line 1's"),
    ],
)
def test_a_bad_line_fails_before_loading_with_its_number(no_loading, tmp_path, capsys, bad, message):
    path = write_lines(tmp_path / "p.jsonl", {"prompt": "fine", "output": "dup.mp4"}, bad, {"prompt": "y"})
    assert main(["generate", "--model", "tiny", "--prompts-file", path]) == 2
    err = capsys.readouterr().err
    assert re.search(re.escape(path) + ", " + message, err), err


def test_empty_prompts_file_and_exclusive_with_prompt(no_loading, tmp_path, capsys):
    path = write_lines(tmp_path / "p.jsonl", "")
    assert main(["generate", "--model", "tiny", "--prompts-file", path]) == 2
    assert "has no prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "tiny", "--prompts-file", path, "--prompt", "x"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_a_failing_prompt_is_reported_and_the_next_runs(tmp_path, monkeypatch, capsys):
    real = wanfast.pipeline.WanPipeline.run

    def run(self, params, progress=None, **kw):
        if params.prompt == "boom":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, params, progress, **kw)

    monkeypatch.setattr(wanfast.pipeline.WanPipeline, "run", run)
    path = write_lines(tmp_path / "p.jsonl", {"prompt": "a"}, {"prompt": "boom"}, {"prompt": "c"})
    out = tmp_path / "v.mp4"
    argv = ["generate", "--model", "tiny", "--prompts-file", path, "--output", str(out), "--no-progress"]
    assert main([*argv, "--steps", "1", "--frames", "1"]) == 1
    assert (tmp_path / "v_0.mp4").is_file() and (tmp_path / "v_2.mp4").is_file()
    assert not (tmp_path / "v_1.mp4").exists()
    captured = capsys.readouterr()
    assert "[2/3] line 2: FAILED: OutOfMemoryError: CUDA out of memory (simulated)" in captured.err
    assert "total: 3 prompts, 2 done, 1 failed" in captured.out and "failed lines: 2" in captured.out


# --- flags -> settings -------------------------------------------------------------------------------


def test_new_generate_flags_map_to_settings_and_params(no_loading, capsys):
    from wanfast.cli import _overrides, _read_prompt, spec_params

    def _params(args, spec):
        return spec_params(spec, _read_prompt(args), None, _overrides(args))

    def parse(*flags):
        return build_parser().parse_args(["generate", "--model", "tiny", "--prompt", "x", *flags])

    args = parse("--t5-cpu", "--self-attention", "sage8", "--memory-budget", "24", "--step-cache", "0.05")
    s = engine_settings(args)
    assert (s.text_encoder_device, s.self_attention_backend, s.memory_budget_gb) == ("cpu", "sage8", 24.0)
    assert _params(args, SPECS["tiny"]).step_cache_threshold == 0.05
    default = engine_settings(parse())
    assert (default.text_encoder_device, default.self_attention_backend, default.memory_budget_gb) == (
        None,
    ) * 3
    assert _params(parse(), SPECS["tiny"]).step_cache_threshold == 0.0  # off by default
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--step-cache", "-1"]) == 2
    assert "step_cache_threshold must be >= 0" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--memory-budget", "0"]) == 2
    assert "memory budget must be > 0" in capsys.readouterr().err


# --- memory budget -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_tiny(tmp_path_factory):
    """A tiny checkpoint with 8 blocks: deep enough that streaming blocks needs less than one expert."""
    tiny = SPECS["tiny"]
    preset = replace(tiny, dit=replace(tiny.dit, num_layers=8))
    return write_official_checkpoint(tmp_path_factory.mktemp("deep"), preset, seed=3)


def needs(folder, size=(32, 32), frames=5) -> dict:
    model = open_model(folder)
    preset, fp8 = model.spec, model.fp8_checkpoint
    assert preset.dit.num_layers == 8 and preset.text_encoder == SPECS["tiny"].text_encoder and not fp8
    need = {
        m: estimate_memory(preset, size, frames, m, dtype=torch.float32) for m in (None, "expert", "blocks")
    }
    assert need[None] > need["expert"] > need["blocks"], need
    return need


def between(lo: int, hi: int) -> str:
    return repr((lo + hi) / 2 / GiB)


def test_memory_budget_picks_the_fastest_mode_that_fits(deep_tiny, tmp_path, capsys):
    need = needs(deep_tiny)
    budgets = {
        None: between(need[None], need[None] + 2**20),
        "expert": between(need["expert"], need[None]),
        "blocks": between(need["blocks"], need["expert"]),
    }
    label = {None: "resident", "expert": "--offload expert", "blocks": "--offload blocks"}
    base = ["generate", "--ckpt-dir", str(deep_tiny), "--prompt", "x", *SMALL, "--no-progress"]
    for mode, budget in budgets.items():
        lat = tmp_path / f"{mode}.safetensors"
        argv = [
            *base,
            "--memory-budget",
            budget,
            "--output",
            str(tmp_path / "v.mp4"),
            "--save-latents",
            str(lat),
        ]
        assert main(argv) == 0
        err = capsys.readouterr().err
        assert f"-> {label[mode]} (the fastest that fits)" in err, err
        assert f"memory budget {float(budget):g} GiB, 32x32 x 5 frames" in err
    # every mode computes the same video
    lats = [load_file(tmp_path / f"{m}.safetensors")["latents"] for m in budgets]
    assert all(torch.allclose(lats[0], x, atol=1e-5) for x in lats[1:])
    # nothing fits
    assert main([*base, "--memory-budget", between(need["blocks"] // 2, need["blocks"])]) == 2
    err = capsys.readouterr().err
    assert "no memory mode fits" in err and "nothing fits: use a smaller size" in err
    # an explicit mode the budget does not hold: the error names the one that fits
    argv = [*base, "--offload", "expert", "--memory-budget", budgets["blocks"]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--offload expert does not fit" in err and "--offload blocks fits" in err
    argv = [
        *base,
        "--offload",
        "blocks",
        "--memory-budget",
        budgets["expert"],
        "--output",
        str(tmp_path / "b.mp4"),
    ]
    assert main(argv) == 0 and "-> --offload blocks (asked for, fits)" in capsys.readouterr().err


def test_memory_budget_plans_for_the_largest_line_of_a_prompts_file(deep_tiny, tmp_path, capsys):
    small, big = needs(deep_tiny), needs(deep_tiny, (64, 64), 9)
    assert small[None] < big["blocks"]  # planned for the small line alone, resident would fit
    budget = between(big["blocks"], big["expert"])
    path = write_lines(tmp_path / "p.jsonl", {"prompt": "a"}, {"prompt": "b", "size": "64x64", "frames": 9})
    argv = ["generate", "--ckpt-dir", str(deep_tiny), "--prompts-file", path, *SMALL, "--no-progress"]
    assert main([*argv, "--memory-budget", budget, "--output", str(tmp_path / "v.mp4")]) == 0
    err = capsys.readouterr().err
    assert "64x64 x 9 frames" in err and "-> --offload blocks" in err  # the largest request decides
    assert read_mp4(tmp_path / "v_1.mp4")[0].shape == (9, 64, 64, 3)


def test_api_load_pipeline_picks_the_same_mode(deep_tiny, caplog):
    need = needs(deep_tiny)
    settings = EngineSettings(device="cpu", dtype=torch.float32, vae_dtype=torch.float32)
    budget = (need["blocks"] + need["expert"]) / 2 / GiB
    with caplog.at_level(logging.INFO, logger="wanfast.builder"):
        pipe = load_pipeline(
            deep_tiny, settings=replace(settings, memory_budget_gb=budget), plan_sizes=[(32, 32, 5)]
        )
    assert pipe.settings.offload == "blocks" and pipe.offload.mode == "blocks"
    assert "-> --offload blocks (the fastest that fits)" in caplog.text
    default = needs(deep_tiny, (64, 48), 9)  # no plan_sizes: the model's default size and frames
    pipe = load_pipeline(deep_tiny, settings=replace(settings, memory_budget_gb=(default[None] + GiB) / GiB))
    assert pipe.settings.offload is None and getattr(pipe, "offload", None) is None
    with pytest.raises(MemoryBudgetError, match="no memory mode fits"):
        load_pipeline(deep_tiny, settings=replace(settings, memory_budget_gb=1e-6))


def test_estimates_count_fp8_and_the_text_encoder_placement():
    a14b = SPECS["t2v-A14B"]
    bf16, fp8 = weight_sizes(a14b), weight_sizes(a14b, quant="fp8")
    assert 0.45 < fp8.expert / bf16.expert < 0.55 and fp8.non_block == bf16.non_block
    assert weight_sizes(a14b, text_encoder_on_device=False).text_encoder == 0 < bf16.text_encoder
    s = EngineSettings(device="cuda", dtype=torch.bfloat16, memory_budget_gb=24, text_encoder_device="cpu")
    assert plan_memory(s, a14b, [(1280, 720, 81)])[0].offload == "blocks"
    with pytest.raises(MemoryBudgetError, match="use a smaller size or fewer frames, --quant fp8, --t5-cpu"):
        plan_memory(replace(s, text_encoder_device=None), a14b, [(1280, 720, 81)])
    # 45 GiB, FP8, T5 on the CPU: resident fits once quantised, not while the bf16 checkpoint loads
    fp8_settings = replace(s, memory_budget_gb=45, quant="fp8")
    need = estimate_memory(a14b, (1280, 720), 81, None, text_encoder_on_device=False, quant="fp8")
    assert need < 45 * GiB
    planned, why = plan_memory(fp8_settings, a14b, [(1280, 720, 81)], fp8_checkpoint=False)
    assert planned.offload == "expert" and "loading the bf16 checkpoint needs" in why
    assert plan_memory(fp8_settings, a14b, [(1280, 720, 81)], fp8_checkpoint=True)[0].offload is None


# --- server ------------------------------------------------------------------------------------------


def test_serve_flags_reach_the_worker_settings(tmp_path):
    flags = ["--quant", "fp8", "--offload", "blocks", "--memory-budget", "20", "--t5-cpu"]
    flags += ["--self-attention", "sdpa-math", "--no-compile", "--device", "cpu"]
    args = build_parser().parse_args(["serve", "--model", "tiny", *flags])
    cfg = json.loads(json.dumps(worker_config(args, tmp_path)))  # as the worker process receives it
    s = worker_settings(cfg)
    assert (s.quant, s.offload, s.memory_budget_gb, s.text_encoder_device) == ("fp8", "blocks", 20.0, "cpu")
    assert (s.self_attention_backend, s.compile, s.device, s.dtype) == (
        "sdpa-math",
        False,
        "cpu",
        torch.float32,
    )
    plain = worker_settings(worker_config(build_parser().parse_args(["serve", "--model", "tiny"]), tmp_path))
    assert (plain.quant, plain.offload, plain.memory_budget_gb, plain.compile) == (None, None, None, None)
    why, fits = check_memory(cfg)
    assert "-> --offload blocks (asked for, fits)" in why
    with pytest.raises(MemoryBudgetError, match="--offload blocks does not fit"):
        check_memory({**cfg, "settings": {**cfg["settings"], "memory_budget_gb": 1e-6}})


def test_serve_rejects_a_request_its_budget_cannot_hold_before_queueing(tmp_path):
    """The worker plans its mode for the default request; a larger one is a 422 at submission (naming
    the mode that would fit), not an out-of-memory failure in the worker."""
    from fastapi.testclient import TestClient

    from wanfast.accel.offload import estimate_memory
    from wanfast.server.app import ServerSettings, create_app
    from wanfast.server.jobs import JobStore

    tiny = SPECS["tiny"]
    d = tiny.defaults
    kw = dict(dtype=torch.float32, text_encoder_on_device=True)
    resident = estimate_memory(tiny, d.size, d.frames, None, **kw)
    big = (d.size[0] * 4, d.size[1] * 4)
    assert estimate_memory(tiny, big, d.frames, None, **kw) > resident  # activations grow with the size
    budget = (resident + 1) / 2**30  # resident just fits the default request
    args = build_parser().parse_args(
        ["serve", "--model", "tiny", "--device", "cpu", "--memory-budget", str(budget)]
    )
    why, fits = check_memory(worker_config(args, tmp_path))
    assert "-> resident (the fastest that fits)" in why
    fits(resolve_params(tiny, "a cat"))  # the default fits
    with pytest.raises(MemoryBudgetError, match=rf"{big[0]}x{big[1]} x {d.frames} frames does not fit"):
        fits(resolve_params(tiny, "a cat", width=big[0], height=big[1]))
    store = JobStore(tmp_path / "jobs.db")
    app = create_app(store, ServerSettings(results_dir=tmp_path, spec=tiny, fits=fits))
    with TestClient(app) as client:
        ok = client.post("/v1/videos", json={"prompt": "a cat"})
        too_big = client.post("/v1/videos", json={"prompt": "a cat", "size": f"{big[0]}x{big[1]}"})
    assert ok.status_code == 202
    assert (
        too_big.status_code == 422 and "does not fit this server's memory budget" in too_big.json()["detail"]
    )
    assert store.list()[1] == 1  # only the one that fits was queued


def test_job_body_accepts_cfg_steps_and_step_cache_threshold():
    defaults = SPECS["tiny"]  # validated against the tiny spec
    stored, params, _ = validate_request(
        VideoRequest(prompt="a cat", cfg_steps=2, step_cache_threshold=0.05), defaults, 100
    )
    assert stored["cfg_steps"] == 2 and stored["step_cache_threshold"] == 0.05
    assert (params.cfg_steps, params.step_cache_threshold) == (2, 0.05)
    _, params, _ = validate_request(VideoRequest(prompt="a cat"), defaults, 100)
    assert (params.cfg_steps, params.step_cache_threshold) == (None, 0.0)
    for bad in ({"cfg_steps": -1}, {"step_cache_threshold": -0.5}, {"cfg_steps": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):  # the schema (types) or the shared rule
            validate_request(VideoRequest(prompt="x", **bad), defaults, 100)
