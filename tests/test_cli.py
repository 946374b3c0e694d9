"""``wanfast generate``: the tiny demo, a real checkpoint folder, and bad input failing before any load."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import wanfast.api
import wanfast.config
import wanfast.pipeline
import wanfast.specs
from wanfast.cli import main
from wanfast.video import read_mp4


def test_tiny_demo_writes_mp4_latents_and_summary(tmp_path, capsys):
    out, lat = tmp_path / "cat.mp4", tmp_path / "cat.safetensors"
    argv = [
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "a cat",
        "--output",
        str(out),
        "--save-latents",
        str(lat),
    ]
    assert main(argv + ["--no-progress", "--seed", "5"]) == 0
    frames, fps = read_mp4(out)
    assert frames.shape == (9, 48, 64, 3) and fps == 16  # the tiny preset: 64x48, 9 frames, 16 fps
    latents = load_file(lat)["latents"]
    assert latents.shape == (16, 3, 6, 8) and latents.dtype == torch.float32
    summary = capsys.readouterr().out
    for row in ("text encoding", "high-noise expert", "low-noise expert", "VAE decode", "total", "seed 5"):
        assert row in summary


def test_ckpt_dir_with_overrides(tmp_path, tiny_diffusers, capsys):
    lat = tmp_path / "l.safetensors"
    argv = [
        "generate", "--ckpt-dir", str(tiny_diffusers), "--prompt", "a dog", "--size", "32x32", "--frames", "5",
        "--steps", "3", "--solver", "dpm++", "--shift", "3", "--guidance-high-noise", "2",
        "--guidance-low-noise", "1.5", "--boundary", "0.8", "--device", "cpu", "--dtype", "fp32",
        "--output", str(tmp_path / "d.mp4"), "--save-latents", str(lat), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    assert load_file(lat)["latents"].shape == (16, 2, 4, 4)
    out = capsys.readouterr().out  # dpm++ timesteps [1000, 857, 600]: two above the 800 boundary
    assert "high-noise expert  2 steps" in out and "low-noise expert   1 step," in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "100x64"], "width must be a positive multiple of 16"),
        (["--size", "64x40"], "height must be a positive multiple of 16"),
        (["--frames", "10"], "frames must be 4n\\+1"),
        (["--steps", "0"], "steps must be an integer >= 1"),
        (["--boundary", "2"], "boundary must be in"),
    ],
)
def test_bad_input_fails_before_loading(no_loading, capsys, extra, message):
    assert main(["generate", "--model", "tiny", "--prompt", "a cat", *extra]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_unknown_solver_and_bad_size_syntax_are_usage_errors(no_loading, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "tiny", "--prompt", "x", "--solver", "ddim"])
    assert e.value.code == 2 and "invalid choice: 'ddim'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "--model", "tiny", "--prompt", "x", "--size", "big"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


def test_unreadable_prompt_file(no_loading, tmp_path, capsys):
    assert main(["generate", "--model", "tiny", "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "cannot read prompt file" in capsys.readouterr().err
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9")
    assert main(["generate", "--model", "tiny", "--prompt-file", str(bad)]) == 2
    assert "cannot read prompt file" in capsys.readouterr().err


def test_bad_checkpoint_folder_fails_before_loading(no_loading, tmp_path, capsys):
    assert main(["generate", "--ckpt-dir", str(tmp_path / "none"), "--prompt", "x"]) == 2
    assert "checkpoint folder not found" in capsys.readouterr().err
    assert main(["generate", "--ckpt-dir", str(tmp_path), "--prompt", "x", "--device", "cpu"]) == 2
    assert "neither an official Wan2.2 layout" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    out = tmp_path / "m.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "wanfast", "generate", "--model", "tiny", "--prompt", "x", "--output", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0 and "total" in proc.stdout and "denoising" in proc.stderr  # progress bar


def test_optimisation_switches_map_to_engine_settings():
    from wanfast.cli import build_parser, engine_settings

    def settings(*flags):
        args = build_parser().parse_args(["generate", "--model", "tiny", "--prompt", "x", *flags])
        return engine_settings(args)

    default = settings()
    assert (
        default.fuse_projections
        and default.cache_cross_kv
        and default.optimize_vae
        and not default.cuda_graphs
    )
    assert default.compile is None  # on where it pays (CUDA)
    assert settings("--plain") == default.plain()
    s = settings(
        "--no-compile", "--no-fuse", "--no-cache", "--no-vae-opt", "--cuda-graphs", "--attention", "sdpa"
    )
    assert (s.compile, s.fuse_projections, s.cache_cross_kv, s.cache_rope, s.optimize_vae) == (False,) * 5
    assert s.cuda_graphs and s.attention_backend == "sdpa"
    assert (
        default.compile_mode is None
        and settings("--compile-mode", "max-autotune").compile_mode == "max-autotune"
    )


def test_plain_and_optimised_generate_the_same_latents(tmp_path):
    paths = []
    for flags in ([], ["--plain"]):
        lat = tmp_path / f"{len(flags)}.safetensors"
        argv = ["generate", "--model", "tiny", "--prompt", "a cat", "--output", str(tmp_path / "v.mp4")]
        assert main([*argv, "--save-latents", str(lat), "--no-progress", *flags]) == 0
        paths.append(load_file(lat)["latents"])
    rel = (paths[0] - paths[1]).norm() / paths[1].norm()
    assert rel < 1e-5, rel  # fp32 on CPU: fused/cached/optimised-VAE paths are exact rewrites


def test_a_split_that_does_not_fit_the_launch_fails_before_loading(no_loading, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--cfg-parallel"]) == 2
    assert "cfg (2) x ulysses (1) = 2 processes; launch with torchrun" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--ulysses", "3"]) == 2
    assert "must divide the DiT's 4 attention heads" in capsys.readouterr().err


def test_ulysses_chunks_flag_reaches_settings_and_fails_before_loading(no_loading, capsys, monkeypatch):
    from wanfast.cli import build_parser, engine_settings

    def settings(*flags):
        return engine_settings(
            build_parser().parse_args(["generate", "--model", "tiny", "--prompt", "x", *flags])
        )

    assert settings().ulysses_chunks == 1  # off: the measured default
    assert settings("--ulysses", "2", "--ulysses-chunks", "2").ulysses_chunks == 2
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: the split fits, the head groups do not
    assert (
        main(["generate", "--model", "tiny", "--prompt", "x", "--ulysses", "2", "--ulysses-chunks", "4"]) == 2
    )
    err = capsys.readouterr().err
    assert "ulysses chunks 4 must divide the 2 heads per rank (4 attention heads over ulysses 2)" in err, err
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--ulysses-chunks", "0"]) == 2
    assert "ulysses_chunks must be an integer >= 1, got 0" in capsys.readouterr().err


def test_sampling_preset_then_explicit_flags():
    from wanfast.cli import _overrides, build_parser, spec_params

    def params(*flags):
        args = build_parser().parse_args(["generate", "--model", "tiny", "--prompt", "x", *flags])
        return spec_params(wanfast.specs.SPECS["tiny"], "x", None, _overrides(args))

    p = params("--sampling-preset", "lightning-4step")
    assert (p.steps, p.solver, p.shift, p.guidance_high_noise, p.guidance_low_noise) == (
        4,
        "euler",
        5.0,
        1.0,
        1.0,
    )
    assert params("--sampling-preset", "lightning-4step", "--steps", "6").steps == 6
    with pytest.raises(wanfast.config.ConfigError, match="unknown sampling preset"):
        params("--sampling-preset", "nope")


def test_missing_lora_file_fails_before_loading(no_loading, tmp_path, capsys):
    argv = [
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "x",
        "--lora-low-noise",
        str(tmp_path / "none.safetensors"),
    ]
    assert main(argv) == 2
    assert "LoRA file not found" in capsys.readouterr().err


def test_out_of_memory_names_the_mode_that_would_fit(monkeypatch, tmp_path, capsys):
    def oom(self, params, progress=None, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(wanfast.pipeline.WanPipeline, "run", oom)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, 60 * 2**30))
    from wanfast.cli import out_of_memory_message

    msg = out_of_memory_message(
        wanfast.specs.SPECS["t2v-A14B"],
        wanfast.specs.resolve_params(wanfast.specs.SPECS["t2v-A14B"], "x"),
        "cuda",
    )
    assert "--offload expert needs" in msg and "use --offload expert" in msg  # 60 GiB: expert mode fits
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--output", str(tmp_path / "o.mp4")]) == 2
    assert "out of GPU memory" in capsys.readouterr().err
