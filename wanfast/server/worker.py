"""The worker process: the only process that touches the device. It loads the pipeline once, keeps it
warm, and runs queued jobs one at a time from the job store.

The web process starts it (``python -m wanfast.server.worker CONFIG``) and watches it with
``WorkerSupervisor``: when it dies, the restart rule of ``wanfast.server.jobs`` is applied to its job
and a new worker is started. The worker exits as soon as its parent does (its stdin reaches EOF), so a
killed server leaves no process holding the GPU.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from dataclasses import asdict
from pathlib import Path

from wanfast.server.jobs import Job, JobStore, NotOwner

log = logging.getLogger("wanfast.server.worker")
POLL_SECONDS = 0.1  # idle wait between claims: a new job starts within this
HEARTBEAT_SECONDS = 1.0


class Cancelled(Exception):
    def __init__(self, step: int, steps: int) -> None:
        super().__init__(f"cancelled by request at step {step} of {steps}")


# -- parent side: start, watch, restart, stop -------------------------------------------------------------
class WorkerSupervisor:
    """Runs the worker process in a thread of the web process; restarts it (with backoff) if it dies."""

    def __init__(self, store: JobStore, config: dict, results_dir: Path) -> None:
        self.store, self.config, self.results_dir = store, config, results_dir
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._run, name="worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self) -> subprocess.Popen:
        owner = uuid.uuid4().hex
        self.store.register_worker(owner)  # fences off any earlier worker before this one exists
        cfg = json.dumps({**self.config, "owner": owner})
        # own session: a Ctrl-C in the terminal reaches the server, which then stops the worker itself
        return subprocess.Popen(
            [sys.executable, "-m", "wanfast.server.worker", cfg],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._proc = self._spawn()
                code = self._proc.wait()
                if self._stop.is_set():
                    break
                self.store.register_worker(None)
                changed = self.store.recover(self.results_dir, f"worker process exited with code {code}")
                self.store.count_worker_restart()
                log.error("worker exited with code %s; restart rule applied to %s", code, changed or "no job")
            except Exception:  # this thread must outlive any error: it is the only one that restarts workers
                log.exception("could not run the worker process")
            failures = failures + 1 if time.monotonic() - started < 60 else 1
            self._stop.wait(min(2.0 ** (failures - 1), 60.0))  # a worker that cannot even load must not spin

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker (closing its stdin ends it) and re-queue its job without counting an attempt."""
        self._stop.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(timeout)
        self.store.register_worker(None)
        self.store.recover(self.results_dir, "server stopped", count_attempt=False)


# -- child side -------------------------------------------------------------------------------------------
def _exit_with_parent() -> None:
    """End this process at once when the server dies: its end of our stdin pipe closes then."""

    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(0)  # no cleanup: the restart rule handles the job, as after a kill

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_settings(cfg: dict):
    """The worker's ``EngineSettings`` from its JSON config (``server.cli.worker_config``)."""
    from wanfast.config import EngineSettings

    return EngineSettings.from_json(cfg["settings"]).resolved()


def _load(cfg: dict):
    import torch

    from wanfast.builder import build_pipeline

    settings = worker_settings(cfg)
    if torch.device(settings.device).type == "cpu":
        # leave a core to the web process: an oversubscribed OpenMP pool slows each step many times over
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    return build_pipeline(cfg["source"], settings)  # a memory budget picks the mode (logged)


def _memory(device) -> dict:
    import torch

    if device.type != "cuda":
        return {}
    return {
        "memory_allocated": torch.cuda.memory_allocated(device),
        "memory_reserved": torch.cuda.memory_reserved(device),
        "memory_total": torch.cuda.get_device_properties(device).total_memory,
    }


def _end(store: JobStore, job: Job, owner: str, state: str, **details) -> str:
    try:
        store.finish(job.id, owner, state, **details)
        return state
    except NotOwner:
        log.warning("job %s was taken from this worker (a restart re-queued it); dropping it", job.id)
        return ""


def run_job(pipe, store: JobStore, job: Job, owner: str, results_dir: Path) -> str:
    """Run one claimed job to a final state; returns that state ('' if the job was taken away)."""
    from wanfast.config import ConfigError
    from wanfast.video import write_mp4

    request = dict(job.request)
    fps = request.pop("fps", None) or pipe.defaults.fps
    size = request.pop("size", None)
    image_path = request.pop("image", None)
    tmp = results_dir / f"{job.id}.tmp.mp4"
    try:
        try:  # the pipeline's own rules, shared with the CLI (the web process checked them already)
            image = None
            if image_path is not None:
                from wanfast.image import load_image

                image = load_image(image_path, "the job's image")
            params = pipe.params(request.pop("prompt"), image, size=tuple(size) if size else None, **request)
        except (ConfigError, FileNotFoundError) as e:
            return _end(store, job, owner, "failed", error=str(e))
        store.start(job.id, owner, asdict(params))
        t0 = time.monotonic()
        first = [t0]

        def progress(i: int, n: int, expert: str) -> None:
            now = time.monotonic()
            if i == 0:
                first[0] = now
            # mean step time: step 0 alone includes text encoding, later ones are measured from step 0
            step_s = (now - first[0]) / i if i else now - t0
            if store.progress(job.id, owner, i + 1, n, expert, step_s, step_s * (n - i - 1)):
                raise Cancelled(i + 1, n)

        result = pipe.run(params, progress, image=image)
        t_write = time.monotonic()
        write_mp4(result.frames, tmp, fps=fps)
        timings = {
            **result.timings,
            "write_mp4": time.monotonic() - t_write,
            "queue_wait": job.started_at - job.created_at,
        }
        return _end(
            store, job, owner, "succeeded", timings=timings, peak_memory_bytes=result.peak_memory_bytes,
            result=(tmp, results_dir / f"{job.id}.mp4"),
        )  # fmt: skip
    except Cancelled as e:
        return _end(store, job, owner, "cancelled", error=str(e))
    except NotOwner:
        log.warning("job %s was taken from this worker (a restart re-queued it); dropping it", job.id)
        return ""
    except Exception as e:  # a failed job must not take the warm worker down with it
        log.error("job %s failed:\n%s", job.id, traceback.format_exc())
        return _end(store, job, owner, "failed", error=f"{type(e).__name__}: {e}")
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cfg = json.loads((argv or sys.argv[1:])[0])
    owner, results_dir = cfg["owner"], Path(cfg["data_dir"]) / "results"
    store = JobStore(Path(cfg["data_dir"]) / "jobs.db")
    _exit_with_parent()
    store.heartbeat(owner, "loading", pid=os.getpid())
    try:
        pipe = _load(cfg)
    except Exception as e:
        store.heartbeat(owner, "failed", detail=f"model load failed: {type(e).__name__}: {e}")
        raise
    state = {"name": "ready"}
    detail = f"{pipe.spec.name} ({cfg['source']})"
    if pipe.settings.offload:
        detail += f" (--offload {pipe.settings.offload})"
    info = {"device": str(pipe.device), "detail": detail}

    def beat(name: str) -> None:
        state["name"] = name
        if not store.heartbeat(owner, name, **info, **_memory(pipe.device)):
            os._exit(0)  # fenced off: a newer worker owns the queue

    def heartbeat() -> None:  # in a thread: a long step must not make the worker look dead
        while True:
            beat(state["name"])
            time.sleep(HEARTBEAT_SECONDS)

    threading.Thread(target=heartbeat, name="heartbeat", daemon=True).start()
    log.info("worker ready: %s on %s", info["detail"], info["device"])
    while True:
        job = store.claim(owner)
        if job is None:
            time.sleep(POLL_SECONDS)
            continue
        beat("busy")
        final = run_job(pipe, store, job, owner, results_dir)
        log.info("job %s: %s", job.id, final or "dropped")
        beat("ready")
        if final == "failed" and pipe.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()  # after an out-of-memory error, start the next job from a clean cache


if __name__ == "__main__":
    raise SystemExit(main())
