"""``wanfast generate --prompts-file FILE --gpus 0,1`` (or ``--workers N``): the lines of a prompts file
spread over a pool of workers, N at a time.

The same code as ``wanfast serve``: the lines become jobs in a job store of a temporary folder, a
``WorkerPool`` of one worker per GPU (``--gpus``) or ``--workers`` workers runs them, each loading the
models once; a video is moved to its line's output once its job has succeeded. A line's video equals the
one-process run of the same line (same seed, same code path: ``WanPipeline.run`` and ``write_mp4``).
A worker that dies is replaced and its line re-run (the restart rule); a line that fails is reported, the
others run, and the exit code is then 1, as in the one-process batch.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from wanfast.config import ConfigError
from wanfast.server.jobs import TERMINAL, JobStore
from wanfast.server.pool import WorkerPool, parse_gpus, plan_slots

# generate flags the pool's workers do not take (server.cli.worker_config carries every engine setting), with
# the value that means "not given": a split inside one worker is --gpus-per-worker of `serve`
UNCARRIED = {"cfg_parallel": False, "ulysses": 1, "save_latents": None}
POLL_SECONDS = 0.2


def check_pool_args(args: argparse.Namespace, items) -> None:
    """Before anything loads: the pool flags need a prompts file and no flag the workers cannot take."""
    if items is None:
        raise ConfigError("--gpus and --workers spread the lines of a --prompts-file; give one")
    given = [name for name, unset in UNCARRIED.items() if getattr(args, name, unset) != unset]
    if given:
        flags = ", ".join("--" + g.replace("_", "-") for g in given)
        raise ConfigError(f"{flags}: not available with --gpus / --workers yet (the pool's workers run the "
                          "default engine with the memory, attention, quant and compile flags)")  # fmt: skip


def run_on_pool(args: argparse.Namespace, items, default_fps: int) -> int:
    """Run ``items`` (``batch.BatchItem``) on a pool; prints a line per prompt as it ends and a total;
    returns 0, or 1 if any prompt failed."""
    from wanfast.server.cli import worker_config

    check_pool_args(args, items)
    gpus = parse_gpus(args.gpus) if args.gpus is not None else None
    if gpus is not None:
        import torch

        if not torch.cuda.is_available() or (args.device or "cuda").startswith("cpu"):
            raise ConfigError("--gpus needs CUDA devices; on the CPU use --workers N")
    slots = plan_slots(gpus, 1, args.workers if gpus is None else None)
    failed, t_all = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wanfast-batch-") as tmp:
        data_dir = Path(tmp)
        results = data_dir / "results"
        results.mkdir()
        store = JobStore(data_dir / "jobs.db")
        pending = {}
        for item in items:
            request = {"prompt": item.prompt, **item.overrides, "fps": item.fps or default_fps}
            if item.image is not None:
                request["image"] = str(Path(item.image).resolve())
            pending[store.submit(request, len(items) + 1)[0].id] = item
        pool = WorkerPool(store, worker_config(args, data_dir), results, slots)
        print(f"{len(items)} prompts on {len(slots)} workers", file=sys.stderr)
        pool.start()
        try:
            done = 0
            while pending:
                time.sleep(POLL_SECONDS)
                _check_workers(store)
                for job_id, item in list(pending.items()):
                    job = store.get(job_id)
                    if job.state not in TERMINAL:
                        continue
                    del pending[job_id]
                    done += 1
                    head = f"[{done}/{len(items)}] line {item.line}"
                    if job.state != "succeeded":
                        failed.append(item.line)
                        print(f"{head}: FAILED: {job.error}", file=sys.stderr)
                        continue
                    item.output.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(results / f"{job_id}.mp4", item.output)
                    p = job.params
                    print(f"{head}: {item.output} ({p['width']}x{p['height']}, {p['frames']} frames, {p['steps']} "
                          f"steps, seed {p['seed']}) in {job.timings['total']:.2f} s on {job.worker}")  # fmt: skip
        finally:
            pool.stop()
    total = time.perf_counter() - t_all
    summary = (
        f"total: {len(items)} prompts, {len(items) - len(failed)} done, {len(failed)} failed, {total:.2f} s"
    )
    summary += f" ({total / len(items):.2f} s per prompt, {len(slots)} workers)"
    if failed:
        summary += f"; failed lines: {', '.join(map(str, sorted(failed)))}"
    print(summary)
    return 1 if failed else 0


def _check_workers(store: JobStore) -> None:
    """A worker that cannot load its model would be restarted for ever: in a batch that is an error."""
    for w in store.workers():
        if w["state"] == "failed":
            raise ConfigError(f"worker {w['name']}: {w['detail']}")
