"""The worker pool of ``wanfast serve`` on GPUs (issue 16 part 3, issue 20 part 1): A14B dimensions with
random weights built on the device (``server.worker._build``: ``synthetic``), through the real pool
(``server.pool.WorkerPool``: worker processes, job store, heartbeats) without HTTP, which is not on a
job's path. ``--model tiny --device cpu`` runs every part on the CPU (a check, not a measurement).

    python benchmarks/pool_gpu.py --part single --out pool_single.json            # 1 GPU
    python benchmarks/pool_gpu.py --part throughput --gpus 0,1 --out pool_2gpu.json
    python benchmarks/pool_gpu.py --part group --gpus 0,1 --out pool_group.json   # one worker over 2 GPUs

- ``single``: one job (832x480x81, 8 steps; ``--size --frames --steps``) through a pool of one worker on
  the first GPU, against the same job run as ``wanfast generate`` runs it once loaded (``WanPipeline.run``,
  then ``write_mp4``), in a fresh process with the same builder and engine settings. Each side: a warm-up
  job (compiles), then ``--repeats`` jobs one after the other. A pool job's time is from its claim to the
  commit of its success (``finished_at - started_at``: the run, the progress writes, the MP4 written and
  fsynced, the transaction); the plain job's time is the run plus ``write_mp4``. Target: pool / plain
  within 3% (the pool adds no overhead).
- ``throughput``: ``--jobs`` jobs (eight by default) submitted at once to a pool of 1 worker, then of one
  worker per GPU of ``--gpus``; after a warm-up job on every worker, jobs per hour from the first
  submission to the last success, and each job's time. Target: 2 workers >= 1.9x the jobs per hour of 1,
  per-job time within 5%.
- ``group``: one worker over all of ``--gpus`` (``--gpus-per-worker``: CFG-parallel, then Ulysses), a
  1280x720x81 job (``--size 1280x720``), a warm-up and ``--repeats`` timed.

The JSON is rewritten after every measurement (a device call has a hard limit). Engine switches go to the
workers as ``wanfast serve`` flags: ``--engine "--quant fp8 --self-attention fa3-fp8"``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from wanfast.server.jobs import TERMINAL, JobStore
from wanfast.server.pool import Slot, WorkerPool, parse_gpus, plan_slots

PROMPT = "a red fox trotting through fresh snow in a pine forest at dawn, cinematic, slow motion"


def worker_cfg(args: argparse.Namespace, data_dir: Path) -> dict:
    """The workers' config as ``wanfast serve`` would give it, with random A14B weights unless tiny."""
    from wanfast.cli import build_parser
    from wanfast.server.cli import worker_config

    argv = ["serve", "--model", "tiny", *shlex.split(args.engine)]
    if args.device:
        argv += ["--device", args.device]
    cfg = worker_config(build_parser().parse_args(argv), data_dir)
    if args.model != "tiny":
        cfg.update(synthetic=args.model)
    return cfg


def request(args: argparse.Namespace) -> dict:
    w, h = (int(v) for v in args.size.split("x"))
    return {"prompt": PROMPT, "size": [w, h], "frames": args.frames, "steps": args.steps, "seed": 0}


def wait_ready(store: JobStore, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [w["state"] for w in store.workers()]
        if states and all(s == "ready" for s in states):
            return
        if "failed" in states:
            raise RuntimeError(f"a worker failed to load: {store.workers()}")
        time.sleep(0.5)
    raise TimeoutError(f"workers not ready after {timeout} s: {store.workers()}")


def wait_done(store: JobStore, ids: list[str], timeout: float) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [store.get(i) for i in ids]
        if all(j.state in TERMINAL for j in jobs):
            bad = [j for j in jobs if j.state != "succeeded"]
            if bad:
                raise RuntimeError(f"job {bad[0].id} {bad[0].state}: {bad[0].error}")
            return jobs
        time.sleep(0.05)
    raise TimeoutError(f"jobs not done after {timeout} s")


def job_row(job) -> dict:
    return {"job_s": job.finished_at - job.started_at, "run_total_s": job.timings["total"],
            "latency_s": job.finished_at - job.created_at, "worker": job.worker, "timings": job.timings}  # fmt: skip


class Pool:
    """A pool on a fresh store in a temporary folder, its workers loaded."""

    def __init__(self, args: argparse.Namespace, slots: list[Slot]) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="wanfast-pool-bench-")
        data = Path(self.tmp.name)
        (data / "results").mkdir()
        self.store = JobStore(data / "jobs.db")
        self.pool = WorkerPool(self.store, worker_cfg(args, data), data / "results", slots)
        t0 = time.perf_counter()
        self.pool.start()
        wait_ready(self.store, args.timeout)
        self.ready_s = time.perf_counter() - t0

    def run(self, req: dict, n: int, timeout: float) -> list:
        """``n`` jobs submitted at once; returns them ended."""
        ids = [self.store.submit(req, n + 1)[0].id for _ in range(n)]
        return wait_done(self.store, ids, timeout)

    def warm(self, req: dict, timeout: float) -> list:
        """Warm-up jobs until every worker has run one (compiles each)."""
        names, jobs = {s.name for s in self.pool.slots}, []
        while {j.worker for j in jobs} != names and len(jobs) < 4 * len(names):
            jobs += self.run(req, len(names), timeout)
        return jobs

    def close(self) -> None:
        self.pool.stop()
        self.tmp.cleanup()


def plain_process(args: argparse.Namespace, gpu: int | None) -> dict:
    """In a fresh process on ``gpu``: the job as ``wanfast generate`` runs it once loaded, warm-up +
    repeats."""
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else {}))
    with tempfile.TemporaryDirectory(prefix="wanfast-plain-bench-") as tmp:
        out = Path(tmp) / "plain.json"
        cmd = [sys.executable, __file__, "--plain-out", str(out), *sys.argv[1:]]
        subprocess.run(cmd, check=True, timeout=args.timeout * 3, env=env)
        return json.loads(out.read_text())


def plain_run(args: argparse.Namespace) -> None:
    import torch

    from wanfast.server.worker import _build
    from wanfast.video import write_mp4

    with tempfile.TemporaryDirectory(prefix="wanfast-plain-") as tmp:
        cfg = worker_cfg(args, Path(tmp))
        t0 = time.perf_counter()
        pipe = _build(cfg)
        if pipe.device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # as a pool of one worker sets it
        built_s, rows = time.perf_counter() - t0, []
        req = request(args)
        params = pipe.params(
            req["prompt"], size=tuple(req["size"]), frames=args.frames, steps=args.steps, seed=0
        )
        for i in range(1 + args.repeats):
            t0 = time.perf_counter()
            result = pipe.run(params)
            write_mp4(result.frames, Path(tmp) / f"{i}.mp4", fps=pipe.defaults.fps)
            rows.append({"job_s": time.perf_counter() - t0, "run_total_s": result.timings["total"],
                         "timings": result.timings})  # fmt: skip
    Path(args.plain_out).write_text(json.dumps({"build_s": built_s, "warmup": rows[0], "jobs": rows[1:]}))


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def part_single(args: argparse.Namespace, gpus: list[int] | None) -> dict:
    plain = plain_process(args, gpus[0] if gpus else None)
    pool = Pool(args, [Slot("w0", (gpus[0],) if gpus else None)])
    try:
        warm = pool.warm(request(args), args.timeout)
        jobs = [job_row(pool.run(request(args), 1, args.timeout)[0]) for _ in range(args.repeats)]
    finally:
        pool.close()
    ratio = median(jobs, "job_s") / median(plain["jobs"], "job_s")
    return {"plain": plain, "pool": {"ready_s": pool.ready_s, "warmup": [job_row(j) for j in warm], "jobs": jobs},
            "pool_over_plain": ratio, "pool_over_plain_run_only": median(jobs, "run_total_s") / median(plain["jobs"], "run_total_s"),
            "target": "pool_over_plain <= 1.03"}  # fmt: skip


def part_throughput(args: argparse.Namespace, gpus: list[int] | None) -> dict:
    runs = {}
    counts = sorted({1, len(gpus) if gpus else args.workers})
    for n in counts:
        slots = plan_slots(gpus[:n], 1) if gpus else plan_slots(None, 1, n)
        pool = Pool(args, slots)
        try:
            warm = pool.warm(request(args), args.timeout)
            t0 = time.time()
            jobs = pool.run(request(args), args.jobs, args.timeout * args.jobs)
        finally:
            pool.close()
        wall = max(j.finished_at for j in jobs) - t0
        rows = [job_row(j) for j in jobs]
        runs[str(n)] = {"workers": n, "ready_s": pool.ready_s, "warmup_jobs": len(warm), "wall_s": wall,
                        "jobs_per_hour": args.jobs / wall * 3600, "job_s_median": median(rows, "job_s"),
                        "jobs_by_worker": {w: sum(r["worker"] == w for r in rows) for w in sorted({r["worker"] for r in rows})},
                        "jobs": rows}  # fmt: skip
    lo, hi = runs[str(counts[0])], runs[str(counts[-1])]
    return {"runs": runs, "speedup": hi["jobs_per_hour"] / lo["jobs_per_hour"],
            "per_job_ratio": hi["job_s_median"] / lo["job_s_median"],
            "target": "speedup >= 1.9 with 2 workers, per_job_ratio within 1.05"}  # fmt: skip


def part_group(args: argparse.Namespace, gpus: list[int] | None) -> dict:
    ranks = len(gpus) if gpus else args.workers
    pool = Pool(args, [Slot("w0", tuple(gpus) if gpus else None, ranks)])
    try:
        warm = pool.run(request(args), 1, args.timeout)
        jobs = [job_row(pool.run(request(args), 1, args.timeout)[0]) for _ in range(args.repeats)]
    finally:
        pool.close()
    return {"ranks": ranks, "ready_s": pool.ready_s, "warmup": job_row(warm[0]), "jobs": jobs,
            "job_s_median": median(jobs, "job_s")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="single", help="single, throughput, group (comma-separated)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--gpus", default=None, help="CUDA devices (default: 0 for single, all for the others)")
    ap.add_argument(
        "--workers", type=int, default=2, help="without GPUs: workers (throughput) or ranks (group)"
    )
    ap.add_argument("--model", default="t2v-A14B", help="a preset with random weights, or tiny")
    ap.add_argument("--device", default=None, help="cpu for a CPU check (default: the workers' default)")
    ap.add_argument("--engine", default="", help="wanfast serve engine flags for the workers")
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for a pool to load or a job to end")
    ap.add_argument("--commit", default=os.environ.get("WANFAST_COMMIT", "unknown"))
    ap.add_argument("--plain-out", default=None, help=argparse.SUPPRESS)  # the plain side's own process
    args = ap.parse_args()
    if args.plain_out:
        return plain_run(args)
    import torch

    cuda = torch.cuda.is_available() and args.device != "cpu"
    gpus = parse_gpus(args.gpus) if args.gpus else (list(range(torch.cuda.device_count())) if cuda else None)
    res = {"date": time.strftime("%Y-%m-%d"), "commit": args.commit, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if cuda else "cpu", "gpus": gpus, "model": args.model,
           "request": {**request(args), "prompt": "..."}, "engine": args.engine, "parts": {}}  # fmt: skip
    parts = {"single": part_single, "throughput": part_throughput, "group": part_group}
    for name in args.part.split(","):
        t0 = time.perf_counter()
        res["parts"][name] = parts[name](args, gpus)
        res["parts"][name]["part_s"] = time.perf_counter() - t0
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        print(name, json.dumps({k: v for k, v in res["parts"][name].items() if not isinstance(v, (dict, list))}),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
