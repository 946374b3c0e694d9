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
