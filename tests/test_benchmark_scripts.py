"""The GPU measurement scripts in benchmarks/ run end to end on the tiny model on the CPU, so a device call
(minutes of a 30-minute budget) does not find them broken."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_modes_script_runs_every_part_on_the_tiny_model(tmp_path):
    out = tmp_path / "modes.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "modes_gpu.py"), "--out", str(out), "--model", "tiny",
           "--device", "cpu", "--parts", "budget1,lightning,stepcache", "--min-left", "0"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert "error" not in json.dumps(parts).replace('"error": null', ""), parts
    budget = parts["budget1"]
    assert budget["run"]["steps_per_expert"] == {"high_noise": 2, "low_noise": 1} and budget["run"]["finite"]
    assert budget["host_after_setup_GiB"]["VmRSS"] > 0  # host memory recorded (pinned buffers show there)
    light = parts["lightning"]
    assert light["params"]["steps"] == 4 and light["params"]["guidance_high_noise"] == 1.0
    assert len(light["warm"]["step_s"]) == 4
    runs = parts["stepcache"]["runs"]
    assert runs["0.0"]["forwards"] == {"computed": 16, "skipped": 0, "high_noise_computed": 8,
                                       "high_noise_skipped": 0, "low_noise_computed": 8, "low_noise_skipped": 0}  # fmt: skip
    never = runs["1000000000.0"][
        "forwards"
    ]  # only the forced forwards: first call per expert/branch, last step
    assert never["computed"] + never["skipped"] == 16 and never["skipped"] > 0
    assert runs["0.0"]["latent_rel_err_vs_off"] == 0.0 and runs["1000000000.0"]["latent_rel_err_vs_off"] > 0


def test_multigpu_script_runs_split_under_torchrun(tmp_path):
    """benchmarks/multigpu_gpu.py under torchrun with 2 gloo processes (Ulysses 2, its all-to-alls in 2
    overlapped head groups) and alone: the same request gives the same per-expert step counts; every timing
    is there."""
    import socket

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    common = ["--model", "tiny", "--device", "cpu", "--sizes", "64x48", "--steps", "3", "--repeats", "1"]
    script = str(ROOT / "benchmarks" / "multigpu_gpu.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {
        "u2": [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(port), script, "--split", "u2", "--ulysses-chunks", "2"],
        "one": [sys.executable, script, "--split", "one"],
    }  # fmt: skip
    rows = {}
    for split, cmd in runs.items():
        out = tmp_path / f"{split}.json"
        proc = subprocess.run(
            [*cmd, *common, "--out", str(out)], capture_output=True, text=True, timeout=300, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        res = json.loads(out.read_text())
        assert (res["split"], res["world"]) == (split, 2 if split == "u2" else 1)
        assert res["ulysses_chunks"] == (2 if split == "u2" else 1)
        rows[split] = res["sizes"]["64x48"]
    for row in rows.values():
        assert (
            row["forward_s"] > 0 and row["step_s"] > 0 and row["generate_s"] > 0 and row["generate"]["finite"]
        )
    assert rows["u2"]["generate"]["steps_per_expert"] == rows["one"]["generate"]["steps_per_expert"]


def test_multigpu_script_refuses_a_split_that_does_not_fit_the_launch(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "multigpu_gpu.py"), "--split", "cfg2", "--out", str(tmp_path / "x"),
           "--model", "tiny", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0 and "needs cfg (2) x ulysses (1) = 2 processes" in proc.stderr, proc.stderr[
        -2000:
    ]
    # the split fits (WORLD_SIZE as torchrun sets it) but 4 head groups do not divide 2 heads per rank
    cmd[cmd.index("cfg2")] = "u2"
    env["WORLD_SIZE"] = "2"
    proc = subprocess.run(
        [*cmd, "--ulysses-chunks", "4"], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode != 0 and "ulysses chunks 4 must divide the 2 heads per rank" in proc.stderr, (
        proc.stderr[-2000:]
    )


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_script_sorts_kernels_into_categories():
    """benchmarks/profile_forward.py's bookkeeping on kernel names as Hopper profiles print them, and a
    stand-in profile: totals per name, attention launches split self / cross by order."""
    from types import SimpleNamespace

    import torch

    prof = _script("profile_forward")
    names = {
        "void flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<2, cute::tuple<>, cutlass::float_e4m3_t>>": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1": "attention",
        "_attn8_fwd": "attention",
        "sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1": "gemm",
        "nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "gemm",
        "void cutlass::device_kernel<cutlass3x_sm90_tensorop_s64x256x32gemm_e4m3>": "gemm",
        "triton_red_fused__to_copy_add_mean_mul_native_layer_norm_0": "fused_elementwise",
        "triton_poi_fused_abs_amax_clamp_div_1": "fused_elementwise",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "other",
    }  # fmt: skip
    for name, want in names.items():
        assert prof.category(name) == want, name
    cuda = torch.autograd.DeviceType.CUDA

    def ev(name, us, start):
        return SimpleNamespace(
            name=name, device_type=cuda, device_time_total=us, time_range=SimpleNamespace(start=start)
        )

    fa3, gemm = "void flash::FlashAttnFwdSm90<x>", "nvjet_tst_x"
    events = [ev(fa3, 100.0, 0), ev(gemm, 10.0, 1), ev(fa3, 5.0, 2), ev(fa3, 100.0, 3), ev(fa3, 5.0, 4)]
    events.append(
        SimpleNamespace(name="cpu op", device_type=torch.autograd.DeviceType.CPU, device_time_total=0.0)
    )
    fake = SimpleNamespace(events=lambda: events)
    table = prof.kernel_table(fake)
    assert table[0][0] == fa3 and abs(table[0][1] - 210e-6) < 1e-12 and table[0][2] == 4
    assert [r[0] for r in table] == [fa3, gemm]  # the CPU event is not a kernel
    split = prof.attention_split(fake)
    assert abs(split["self_attention"] - 200e-6) < 1e-12 and abs(split["cross_attention"] - 10e-6) < 1e-12
    assert split["attention_launches"] == 4
    assert prof.settings_of("fp8+fa3-fp8").self_attention_backend == "fa3-fp8"
    assert prof.settings_of("fp8").quant == "fp8" and prof.settings_of("bf16").quant is None
