"""``wanfast serve`` with prelaunched workers on several GPUs (issue #17's prelaunch, on nvidia-h200-x2): the
tiny model served by one CFG-parallel worker over two GPUs, then by two one-GPU workers, each prelaunched and
with ``--no-prelaunch``; per run the seconds to ``/health`` ok and one 2-step job's final state.
    python3 benchmarks/prelaunch_gpu.py --out r.json
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

RUNS = {
    "cfg2_worker": ["--gpus", "0,1", "--gpus-per-worker", "2"],
    "two_workers": ["--gpus", "0,1"],
}


def _get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return None


def run(name: str, flags: list[str], timeout: float, device: str = "cuda") -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = Path(tempfile.mkdtemp(prefix=f"wanfast-prelaunch-{name}-"))
    cmd = [sys.executable, "-m", "wanfast", "serve", "--model", "tiny", "--device", device, "--port", str(port),
           "--data-dir", str(data), *flags]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=open(data / "server.log", "w"), stderr=subprocess.STDOUT)
    ready, state, health = None, None, None
    try:
        while time.perf_counter() - t0 < timeout and proc.poll() is None:
            health = _get(f"{base}/health")
            if health and health.get("status") == "ok":
                ready = time.perf_counter() - t0
                break
            time.sleep(0.1)
        if ready is not None:
            body = json.dumps({"prompt": "a red fox in the snow", "size": "64x64", "frames": 5, "steps": 2})
            req = urllib.request.Request(
                f"{base}/v1/videos", body.encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=10) as r:
                job = json.loads(r.read())["id"]
            while time.perf_counter() - t0 < timeout:
                state = (_get(f"{base}/v1/videos/{job}") or {}).get("state")
                if state in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(60)
    log = (data / "server.log").read_text(errors="replace")
    return {"cmd": cmd, "ready_s": ready, "job_state": state, "health": health, "log_tail": log[-1500:]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--timeout", type=float, default=150.0)
    a = p.parse_args()
    out = {}
    for name, flags in RUNS.items():
        for extra in ([], ["--no-prelaunch"]):
            key = name + ("_noprelaunch" if extra else "")
            out[key] = run(key, flags + extra, a.timeout)
            print(key, out[key]["ready_s"], out[key]["job_state"], flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    return 0 if all(r["job_state"] == "succeeded" for r in out.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
