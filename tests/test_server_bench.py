"""benchmarks/pool_gpu.py (the pool's GPU measurements) runs its single and throughput parts end to end on the
tiny model on the CPU, so a device call does not find them broken (the group part's split worker is
tested in test_server_pool.py). CPU times of millisecond jobs mean nothing: only the
structure of the record is checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pool_benchmark_runs_every_part_on_the_cpu(tmp_path):
    out = tmp_path / "pool.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pool_gpu.py"), "--part", "single,throughput",
           "--model", "tiny", "--device", "cpu", "--size", "32x32", "--frames", "1", "--steps", "2",
           "--jobs", "2", "--repeats", "1", "--workers", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["model"] == "tiny" and res["gpus"] is None and res["request"]["size"] == [32, 32]
    single = res["parts"]["single"]
    assert len(single["plain"]["jobs"]) == len(single["pool"]["jobs"]) == 1 and single["pool_over_plain"] > 0
    assert all(j["job_s"] >= j["run_total_s"] > 0 for j in single["pool"]["jobs"] + single["plain"]["jobs"])
    runs = res["parts"]["throughput"]["runs"]
    assert sorted(runs) == ["1", "2"] and all(sum(r["jobs_by_worker"].values()) == 2 for r in runs.values())
    assert runs["2"]["warmup_jobs"] >= 2 and res["parts"]["throughput"]["speedup"] > 0  # each worker warmed
