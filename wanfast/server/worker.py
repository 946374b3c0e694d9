"""A worker process: the only kind of process that touches a device. It loads the pipeline once, keeps it
warm, and runs queued jobs one at a time from the job store.

``wanfast.server.pool`` starts it (``python -m wanfast.server.worker WHERE WHO``: its data folder, slot
name and rank, as JSON, for ``ps``); it imports what every worker needs, then reads its assignment, one
JSON line on stdin: the engine config of ``server.cli.worker_config``, the slot's token, name, rank and
world size, and environment variables (a PostgreSQL URL). A pool may start it before the server has
checked its flags (``pool.Held``): it touches no device, file or store before that line, and EOF instead
of it ends it. The pool watches it: the
worker writes a heartbeat line to its stdout every ``HEARTBEAT_SECONDS`` (its prints go to stderr), and
exits as soon as its parent does (its stdin reaches EOF), so a killed server leaves no process holding a
GPU. A worker of K ranks (a slot of K GPUs) splits every video over them: rank 0 claims the job and
broadcasts it, every rank runs it, rank 0 writes the result; the cancel flag is broadcast after each step.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from wanfast.server import videos
from wanfast.server.jobs import STORE_ERRORS, Job, JobStore, NotOwner
from wanfast.server.lora_library import switch_for_job, worker_switcher

log = logging.getLogger("wanfast.server.worker")
POLL_SECONDS = 0.1  # idle wait between claims: a new job starts within this
HEARTBEAT_SECONDS = 1.0


class Cancelled(Exception):
    def __init__(self, step: int, steps: int) -> None:
        super().__init__(f"cancelled by request at step {step} of {steps}")


def _heartbeat_fd() -> int:
    """The pipe the pool reads heartbeats from (our stdout); stdout itself then goes to stderr, so no
    print of any library can be taken for a heartbeat or block on a full pipe."""
    fd = os.dup(1)
    os.dup2(2, 1)
    return fd


def _exit_with_parent() -> None:
    """End this process at once when the server dies: its end of our stdin pipe closes then."""

    def watch() -> None:
        sys.stdin.buffer.read()
        os._exit(0)  # no cleanup: the restart rule handles the job, as after a kill

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def worker_settings(cfg: dict):
    """The worker's resolved ``EngineSettings``: the serialised ones of its JSON config
    (``server.cli.worker_config``), with what the pool sets per process: this rank's ``device`` and a slot's
    split over its GPUs (``cfg_parallel`` / ``ulysses``, ``server.pool.slot_split``)."""
    from dataclasses import replace

    from wanfast.config import EngineSettings

    settings = EngineSettings.from_json(cfg["settings"])
    own = {k: cfg[k] for k in ("device", "cfg_parallel", "ulysses") if cfg.get(k) is not None}
    return replace(settings, **own).resolved()


def _build(cfg: dict):
    """The pipeline through the builder: the model source of the config (a checkpoint folder or a tiny
    model's name), or with ``cfg["synthetic"]`` (a spec name) random weights at that model's dimensions,
    built on the device (``tools.synthetic``: benchmarks time the real architecture through the pool
    without a checkpoint)."""
    import torch

    settings = worker_settings(cfg)
    if torch.device(settings.device).type == "cpu":
        # leave a core to the web process: an oversubscribed OpenMP pool slows each step many times over
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    if not cfg.get("synthetic"):
        from wanfast.builder import build_pipeline

        return build_pipeline(cfg["source"], settings)  # a memory budget picks the mode (logged)
    from wanfast.builder import plan
    from wanfast.specs import get_spec
    from wanfast.tools.synthetic import random_pipeline

    settings = plan(cfg["synthetic"], settings).settings  # attention checked, split and memory mode settled
    return random_pipeline(get_spec(cfg["synthetic"]), settings.device, settings.dtype, settings.vae_dtype,
                           settings=settings)  # fmt: skip


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
        return store.finish(job.id, owner, state, **details)
    except NotOwner:
        log.warning("job %s was taken from this worker (a restart re-queued it); dropping it", job.id)
        return ""


def _params(pipe, job: Job):
    """The job's ``SamplingParams`` with the loaded model's rules, its frame rate and its image (a
    ``PIL.Image``, or None); its LoRAs are merged by ``switch_for_job``. Raises ``ConfigError``
    (``FileNotFoundError`` for a vanished image)."""
    from wanfast.config import ConfigError

    request = dict(job.request)
    if request.pop("loras", None) and getattr(pipe, "lora_switcher", None) is None:
        # an API process with a library in front of a worker without one: never run without the LoRAs
        raise ConfigError(
            "the job names LoRAs but this worker has no LoRA library (start it with --lora-dir)"
        )
    fps = request.pop("fps", None) or pipe.defaults.fps
    image_path = request.pop("image", None)
    image = None
    if image_path is not None:
        from wanfast.image import load_image

        image = load_image(image_path, "the job's image")
    return pipe.params(request.pop("prompt"), image, **request), fps, image


def run_job(pipe, store: JobStore, job: Job, owner: str, results_dir: Path, sync=None) -> str:
    """Run one claimed job to a final state; returns that state ('' if the job was taken away).
    ``sync(flag) -> flag``: rank 0's half of a split worker's per-step broadcast (None: one process)."""
    from wanfast.config import ConfigError
    from wanfast.video import Mp4Writer, finish_mp4, stream_mp4_enabled

    tmp = results_dir / f"{job.id}.tmp.mp4"
    writer = None
    try:
        try:  # the pipeline's own rules, shared with the CLI (the web process checked them already)
            params, fps, image = _params(pipe, job)
        except (ConfigError, FileNotFoundError) as e:
            return _end(store, job, owner, "failed", error=str(e))
        switched = switch_for_job(pipe, job.request)
        store.start(job.id, owner, asdict(params))
        t0 = time.monotonic()
        first = [t0]

        def progress(i: int, n: int, expert: str) -> None:
            now = time.monotonic()
            if i == 0:
                first[0] = now
            # mean step time: step 0 alone includes text encoding, later ones are measured from step 0
            step_s = (now - first[0]) / i if i else now - t0
            try:
                flag = int(store.progress(job.id, owner, i + 1, n, expert, step_s, step_s * (n - i - 1)))
            except NotOwner:
                flag = 2
            except STORE_ERRORS as e:  # a busy store: this step's progress is not shown, the job goes on
                log.warning("job %s: progress not recorded: %s", job.id, e)
                flag = 0
            flag = sync(flag) if sync is not None else flag
            if flag == 1:
                raise Cancelled(i + 1, n)
            if flag == 2:
                raise NotOwner(f"job {job.id} is no longer owned by this worker")

        if stream_mp4_enabled():  # encoded during the decode; "writing" is then the encoder's tail
            writer = Mp4Writer(tmp, params.width, params.height, fps=fps)
        sink = writer.add if writer is not None else None
        result = pipe.run(params, progress, image=image, frames_sink=sink)
        try:
            store.stage(job.id, owner, "writing")
        except STORE_ERRORS as e:
            log.warning("job %s: stage not recorded: %s", job.id, e)
        t_write = time.monotonic()
        finish_mp4(writer, result.frames, tmp, fps)
        timings = {
            **result.timings,
            "write_mp4": time.monotonic() - t_write,
            "queue_wait": job.started_at - job.created_at,
        }
        if switched is not None:
            timings["lora_switch"] = switched
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
        state = _end(store, job, owner, "failed", error=f"{type(e).__name__}: {e}")
        if sync is not None:  # the other ranks may be waiting in a collective: the slot restarts
            raise
        return state
    finally:
        if writer is not None:
            writer.abort()  # a run that failed or was cancelled: its partial file goes (no-op once closed)
        tmp.unlink(missing_ok=True)


def follow_job(pipe, job: Job, sync) -> None:
    """A rank > 0 of a split worker: run the job rank 0 broadcast, stopping when its flag says so."""
    from wanfast.config import ConfigError

    try:
        params, _, image = _params(pipe, job)
    except (ConfigError, FileNotFoundError):
        return  # rank 0 failed it for the same reason

    def progress(i: int, n: int, expert: str) -> None:
        if sync(0):
            raise Cancelled(i + 1, n)

    try:
        switch_for_job(pipe, job.request)
        pipe.run(params, progress, image=image)
    except Cancelled:
        pass


def _device(cfg: dict, rank: int, world: int) -> str:
    import torch

    device = cfg["settings"].get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return f"cuda:{rank}" if world > 1 and torch.device(device).type == "cuda" else device


def _control_group(world: int):
    """(broadcast of a Python object from rank 0, its group) for a split worker; (None, None) alone. A gloo
    group of its own: control messages never touch the GPUs, and an idle rank may wait in it for days."""
    if world == 1:
        return None
    from datetime import timedelta

    import torch.distributed as dist

    from wanfast.parallel import init_distributed

    init_distributed()
    group = dist.new_group(backend="gloo", timeout=timedelta(days=365))

    def broadcast(obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    return broadcast


def _preload() -> None:
    """What every worker imports before it can build (seconds: torch, the builder, transformers' text
    encoder classes), done while it waits for its assignment: under ``pool.Held`` that wait overlaps
    the server's own start and checks."""
    import wanfast.builder  # noqa: F401  (torch with it)
    from wanfast.loading.text_encoder import import_backend

    import_backend()


def _assignment() -> tuple[dict, dict]:
    """(config, slot) from the one JSON line the pool writes on stdin (``pool._Process.assign``); its
    environment variables are set here. EOF first: the server gave up before assigning it."""
    line = sys.stdin.buffer.readline()
    if not line:
        raise SystemExit(0)
    message = json.loads(line)
    os.environ.update(message.get("env", {}))
    return message["cfg"], message["slot"]


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    beat_fd = _heartbeat_fd()  # first: no print of an import may reach the pool as a heartbeat
    _preload()
    cfg, slot = _assignment()
    _exit_with_parent()
    owner, rank, world = slot["owner"], slot["rank"], slot["world"]
    data_dir = Path(cfg["data_dir"])
    results_dir = data_dir / "results"
    # a PostgreSQL store's URL comes by environment (server.scale.resolve_store); else the server's SQLite file
    target = os.environ["WANFAST_STORE"] if cfg.get("store") == "env" else data_dir / "jobs.db"
    store = JobStore(target, **cfg.get("store_options", {})) if rank == 0 else None
    state, info, device = {"name": "loading"}, {"pid": os.getpid()}, [None]

    def pulse() -> None:  # in a thread: a long step must not make the worker look dead
        while True:
            try:
                os.write(beat_fd, b".\n")
            except OSError:
                os._exit(0)  # the pool is gone
            time.sleep(HEARTBEAT_SECONDS)

    def heartbeat() -> None:  # a thread of its own: a store write that waits on a lock (held, say, by a
        # stopped worker) must not stop the pulse above, or the pool would replace this healthy worker too
        while store is not None:
            try:
                memory = _memory(device[0]) if device[0] is not None else {}
                if not store.heartbeat(owner, state["name"], **info, **memory):
                    os._exit(0)  # fenced off: a newer worker owns this slot
            except STORE_ERRORS as e:  # the pulse says this process lives; the store may be busy
                log.warning("heartbeat not recorded: %s", e)
            time.sleep(HEARTBEAT_SECONDS)

    def set_state(name: str) -> None:  # recorded now, not at the next beat: /health shows busy at once
        state["name"] = name
        try:
            store.heartbeat(owner, name)
        except STORE_ERRORS as e:
            log.warning("state not recorded: %s", e)

    threading.Thread(target=pulse, name="pulse", daemon=True).start()
    threading.Thread(target=heartbeat, name="heartbeat", daemon=True).start()
    broadcast = _control_group(world)
    own = {**cfg, "device": _device(cfg, rank, world)}
    own["data_dir"] = str(data_dir / "workers" / slot["name"] / f"rank{rank}")  # _load's tiny checkpoint
    try:
        pipe = _build(own)
    except Exception as e:
        if store is not None:
            try:
                store.heartbeat(owner, "failed", detail=f"model load failed: {type(e).__name__}: {e}")
            except STORE_ERRORS:
                pass  # the traceback below says it all the same
        raise
    if pipe.device.type == "cpu":
        import torch

        torch.set_num_threads(slot.get("threads", 1))  # the pool's share of the cores for this process
    try:
        worker_switcher(pipe, own)  # own data_dir: a tiny checkpoint per process, no race
    except Exception as e:
        if store is not None:
            try:
                store.heartbeat(owner, "failed", detail=f"LoRA library: {type(e).__name__}: {e}")
            except STORE_ERRORS:
                pass
        raise
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    name = f"cuda:{visible}" if pipe.device.type == "cuda" and visible else str(pipe.device)
    detail = pipe.spec.name + ("" if cfg.get("synthetic") else f" ({Path(str(cfg['source'])).name})")
    if pipe.settings.offload:
        detail += f" (--offload {pipe.settings.offload})"
    info.update(device=name + (f" x{world}" if world > 1 else ""), detail=detail)
    device[0] = pipe.device
    if cfg.get(
        "warm_sizes"
    ):  # every rank runs them (matching collectives); rank 0 reports (server/warmup.py)
        from wanfast.server.warmup import warm_up, write_warm

        if store is not None:
            set_state("warming")
            write_warm(data_dir, slot["name"], [])  # this process's file, empty: none warm yet
        report = (lambda rows: write_warm(data_dir, slot["name"], rows)) if store is not None else None
        warm_up(pipe, [tuple(s) for s in cfg["warm_sizes"]], report)
    state["name"] = "ready"
    log.info("worker %s rank %d ready: %s on %s", slot["name"], rank, detail, name)
    if rank > 0:
        while True:
            follow_job(pipe, broadcast(None), broadcast)
    while True:
        try:
            prefer = getattr(pipe, "lora_key", None)  # with a library: jobs with the set it holds first
            job = store.claim(owner, prefer, cfg.get("lora_max_overtaken", 4))
        except STORE_ERRORS as e:  # a busy store must not end an idle worker
            log.warning("claim failed: %s", e)
            job = None
        if job is None:
            time.sleep(POLL_SECONDS)
            continue
        job = videos.local_inputs(store, job, data_dir / "inputs")  # PostgreSQL: its image, to this host
        if broadcast is not None:
            broadcast(job)
        set_state("busy")
        final = run_job(pipe, store, job, owner, results_dir, broadcast)
        log.info("job %s: %s", job.id, final or "dropped")
        set_state("ready")
        if final == "failed" and pipe.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()  # after an out-of-memory error, start the next job from a clean cache


if __name__ == "__main__":
    raise SystemExit(main())
