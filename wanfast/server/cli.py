"""``wanfast serve``: the HTTP service (web process + a pool of worker processes, ``server.pool``); with
``--api-only``, the web process alone, on a PostgreSQL store shared with ``wanfast worker`` pools
(``server.scale``)."""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from wanfast.config import ConfigError, SamplingParams
from wanfast.flags import add_engine_flags, add_model_source, engine_settings

if TYPE_CHECKING:  # the pool module is imported where a pool starts
    from wanfast.server.pool import Held

log = logging.getLogger("wanfast.server")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP service (see docs/server.md)")
    p.set_defaults(func=serve_main)
    add_model_source(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", type=Path, default=Path("wanfast-data"), help="job database and videos")
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key on every route but /health (default: $WANFAST_API_KEY)",
    )
    p.add_argument("--queue-size", type=int, default=16, help="most jobs waiting; more get 429 (default 16)")
    p.add_argument(
        "--max-prompt-chars", type=int, default=2000, help="longest prompt accepted (default 2000)"
    )
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body (default 64 KiB; 32 MiB for a model that takes an image)")  # fmt: skip
    add_engine_flags(p)  # the same engine flags as generate
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_pool_flags(p)
    add_door_flags(p)
    from wanfast.server.scale import add_store_flags

    add_store_flags(p)
    p.add_argument("--api-only", action="store_true",
                   help="the HTTP service without workers (needs a PostgreSQL --store shared with `wanfast worker`)")  # fmt: skip


def add_pool_flags(p: argparse.ArgumentParser) -> None:
    """The worker pool (``server.pool``): what ``wanfast serve`` and ``wanfast worker`` both run."""
    pool = p.add_argument_group("worker pool")
    pool.add_argument("--gpus", default=None, metavar="LIST",
                      help="CUDA devices to use, e.g. 0,1,2,3: one worker per GPU (or per --gpus-per-worker)")  # fmt: skip
    pool.add_argument("--gpus-per-worker", type=int, default=1, metavar="K",
                      help="GPUs per worker: each video split over K GPUs (CFG-parallel, then Ulysses; default 1)")  # fmt: skip
    pool.add_argument("--workers", type=int, default=None, metavar="N",
                      help="worker processes without --gpus (CPU, or the default GPU; default 1)")  # fmt: skip
    pool.add_argument("--worker-timeout", type=float, default=30.0, metavar="S",
                      help="a worker with no heartbeat for S seconds (hung, or stopped) is replaced (default 30)")  # fmt: skip
    pool.add_argument("--db-timeout", type=float, default=30.0, metavar="S",
                      help="seconds a job-database write waits for its lock before it fails (default 30)")  # fmt: skip
    pool.add_argument("--no-prelaunch", dest="prelaunch", action="store_false",
                      help="start the worker processes only after the flags and the model are checked, not "
                      "beside those checks (their imports then add to the time to ready)")  # fmt: skip
    pool.add_argument("--warm-sizes", default=None, metavar="WxHxF[,...]",
                      help="each worker runs these sizes once (compiling them) before /health says it is ready")  # fmt: skip
    lib = p.add_argument_group("LoRA library")
    lib.add_argument("--lora-dir", type=Path, default=None, metavar="DIR",
                     help="a folder of LoRA .safetensors files that requests may name (GET /v1/loras); each "
                     "checked against the model at start; a worker switches its weights between jobs")  # fmt: skip
    lib.add_argument("--max-loras", type=int, default=4, metavar="N",
                     help="most library LoRAs one request may name (default 4)")  # fmt: skip
    lib.add_argument("--lora-max-overtaken", type=int, default=4, metavar="N",
                     help="a worker prefers queued jobs with the LoRA set it holds, but a job is overtaken by "
                     "at most N newer ones (default 4; 0: strict submission order)")  # fmt: skip


def add_door_flags(p: argparse.ArgumentParser) -> None:
    """What the door lets in (``server.app``)."""
    door = p.add_argument_group("requests")
    door.add_argument("--allowed-hosts", default=None, metavar="LIST",
                      help="Host header names answered, e.g. video.example.com,*.corp or * for any (default: "
                      "the loopback names when bound to loopback, else any)")  # fmt: skip
    door.add_argument("--max-pixel-frames", type=int, default=None, metavar="N",
                      help="largest width x height x frames of one request (default 2.5x the model's default "
                      "request: 186,624,000 for A14B, e.g. 1920x1088 x 81)")  # fmt: skip
    door.add_argument("--max-steps", type=int, default=None, metavar="N",
                      help="most sampling steps of one request (default 2.5x the model's default: 100 for A14B)")  # fmt: skip


def check_pool_args(args: argparse.Namespace, model):
    """What a pool's workers would only find out one by one, checked once at start against ``model`` (an
    ``open_model`` result): the LoRA library (returned, or None) and ``--warm-sizes`` (parsed into
    ``args.warm_size_list`` for ``worker_config``)."""
    library = open_lora_library(args, model)  # a broken LoRA file fails here, not in a job
    if library is not None:
        log.info("LoRA library %s: %s", args.lora_dir, ", ".join(library.entries))
    args.warm_size_list = None
    if getattr(args, "warm_sizes", None):
        from wanfast.server.warmup import parse_warm_sizes

        args.warm_size_list = parse_warm_sizes(args.warm_sizes, model.spec)  # a bad size fails here
    return library


def _lock(data_dir: Path):
    """One server per data directory: a second one would run every job twice. The kernel drops the lock
    when this process dies, however it dies."""
    handle = open(data_dir / "server.lock", "a+")  # held for the life of the process
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"another wanfast server is using {data_dir}") from None
    return handle


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def worker_config(args: argparse.Namespace, data_dir: Path) -> dict:
    """What the worker process gets (JSON): the model source and its serialised ``EngineSettings``."""
    source = args.model if args.model else str(args.ckpt_dir)
    cfg = {"data_dir": str(data_dir), "source": source, "settings": engine_settings(args).to_json()}
    if getattr(args, "lora_dir", None) is not None:
        cfg["lora_dir"] = str(Path(args.lora_dir).resolve())
        cfg["lora_max_overtaken"] = args.lora_max_overtaken
    if getattr(args, "store", None) is not None:  # a PostgreSQL store (default: DATA_DIR/jobs.db)
        from wanfast.server.scale import store_options

        # the URL itself by environment (scale.resolve_store): a password in a command line shows in ps
        cfg.update(store="env", store_options=store_options(args))
    if getattr(args, "warm_size_list", None):  # parsed by check_pool_args; [[w, h, frames], ...]
        cfg["warm_sizes"] = [list(s) for s in args.warm_size_list]
    return cfg


def open_lora_library(args: argparse.Namespace, model):
    """The ``--lora-dir`` library checked against ``model`` (an ``open_model`` result), or None; refuses
    what a worker could not switch, at start."""
    if args.lora_dir is None:
        return None
    from wanfast.server.lora_library import LoraLibrary

    settings = engine_settings(args)
    if args.max_loras < 1 or args.lora_max_overtaken < 0:
        raise ConfigError("--max-loras must be >= 1 and --lora-max-overtaken >= 0")
    if model.fp8_checkpoint:
        raise ConfigError(
            "--lora-dir needs the bf16/fp32 checkpoint: LoRAs merge before FP8 quantisation, and an FP8 "
            "checkpoint holds no unquantised weight; serve the bf16 checkpoint with --quant fp8"
        )
    if settings.lora_stack() or not settings.lora_merge:
        raise ConfigError(
            "--lora-dir cannot be combined with --lora / --lora-high-noise / --lora-low-noise / --lora-separate: "
            "put those files in the library and name them in each request"
        )
    return LoraLibrary.open(args.lora_dir, model.spec)


def check_memory(config: dict, model=None) -> tuple[str | None, Callable[[SamplingParams], None]]:
    """With a memory budget, the mode the worker will pick for the model's default request (raises
    ``MemoryBudgetError`` now rather than in a worker restart loop): (the reason, or None; a check that
    rejects a request too large for that mode and budget before it is queued)."""
    from wanfast.builder import open_model, plan
    from wanfast.config import EngineSettings
    from wanfast.memory import check_request_fits

    settings = EngineSettings.from_json(config["settings"])
    if settings.memory_budget_gb is None:
        return None, lambda params: None
    model = model or open_model(config["source"])
    planned = plan(model, settings)

    def fits(params: SamplingParams) -> None:
        check_request_fits(planned.settings, model.spec, params.width, params.height, params.frames)

    return planned.memory_note, fits


def _exit_cleanly(signum: int, frame) -> None:
    raise SystemExit(0)


def _pool_plan(args: argparse.Namespace, num_heads: int | None):
    """The pool's slots from --gpus / --gpus-per-worker / --workers, checked before anything starts
    (``num_heads`` None: the split over a slot's GPUs is not checked yet)."""
    from wanfast.server.pool import parse_gpus, plan_slots, slot_split

    gpus = parse_gpus(args.gpus) if args.gpus is not None else None
    if gpus is not None and (args.device or "cuda").startswith("cpu"):
        raise ConfigError("--gpus needs CUDA devices; on the CPU use --workers N")
    slots = plan_slots(gpus, args.gpus_per_worker, args.workers)
    if args.gpus_per_worker > 1 and num_heads is not None:
        from wanfast.parallel.dist import check_split  # (torch: not before ``prelaunch``)

        split = slot_split(args.gpus_per_worker)
        check_split(
            split["cfg_parallel"], split["ulysses"], args.gpus_per_worker, num_heads, args.ulysses_chunks
        )
    return slots


@contextmanager
def prelaunched(args: argparse.Namespace) -> Iterator[Held | None]:
    """The pool's worker processes, started now (``pool.Held``: they import while the caller checks the
    flags, the model and the store, then wait for the pool to assign them), or None (``--no-prelaunch``,
    an API-only process). Only the flags that name the slots are checked first. On leaving, those the pool
    did not take (a failed check, a stop) are killed: they only imported."""
    if getattr(args, "api_only", False) or not args.prelaunch:
        yield None
        return
    from wanfast.server.pool import Held
    from wanfast.server.scale import pool_slots, resolve_store

    resolve_store(args)  # the slots' names depend on the store (PostgreSQL: the pool's name)
    held = Held(pool_slots(args, _pool_plan(args, None)), args.data_dir.resolve())
    try:
        yield held
    finally:
        held.close()


def serve_main(args: argparse.Namespace) -> int:
    with prelaunched(args) as held:
        return _serve(args, held)


def _serve(args: argparse.Namespace, held: Held | None) -> int:
    import uvicorn

    from wanfast.builder import open_model, plan
    from wanfast.server.app import ServerSettings, create_app
    from wanfast.server.jobs import open_store
    from wanfast.server.pool import WorkerPool
    from wanfast.server.safety import default_allowed_hosts
    from wanfast.server.scale import (
        Reaper,
        fresh_workers,
        pool_slots,
        require_postgres,
        resolve_store,
        store_options,
    )
    from wanfast.server.schemas import Limits
    from wanfast.server.storedb import is_postgres

    if args.queue_size < 1 or args.max_prompt_chars < 1 or (args.max_body_bytes or 1024) < 1024:
        raise ConfigError("--queue-size and --max-prompt-chars must be >= 1, --max-body-bytes >= 1024")
    model = open_model(args.model or args.ckpt_dir)  # a wrong folder fails here, not in a worker restart loop
    if not args.api_only:  # (an API-only host need not have the workers' devices)
        plan(model, engine_settings(args))  # as do unavailable attention backends and a budget nothing fits
    library = check_pool_args(args, model)
    max_body = args.max_body_bytes or (64 * 1024 if model.spec.image == "none" else 32 * 2**20)
    resolve_store(args)
    options = store_options(args)
    if args.store is not None and not is_postgres(args.store):
        raise ConfigError(f"--store takes a postgresql:// URL, not {args.store!r}: the SQLite store is "
                          "DATA_DIR/jobs.db (--data-dir)")  # fmt: skip
    if args.api_only:
        require_postgres(args, "--api-only")
    slots = [] if args.api_only else pool_slots(args, _pool_plan(args, model.spec.dit.num_heads))
    default = Limits.default(model.spec.defaults)
    limits = Limits(args.max_pixel_frames or default.max_pixel_frames, args.max_steps or default.max_steps)
    if min(limits.max_pixel_frames, limits.max_steps, args.worker_timeout, args.db_timeout) <= 0:
        raise ConfigError("--max-pixel-frames, --max-steps, --worker-timeout and --db-timeout must be > 0")
    hosts = args.allowed_hosts.split(",") if args.allowed_hosts else default_allowed_hosts(args.host)
    hosts = None if hosts is not None and "*" in hosts else hosts
    api_key = args.api_key or os.environ.get("WANFAST_API_KEY") or None
    if not _is_loopback(args.host) and api_key is None:
        print(f"wanfast: warning: serving on {args.host} without an API key", file=sys.stderr)
    logging.getLogger("wanfast").setLevel(logging.INFO)

    data_dir = args.data_dir.resolve()
    results = data_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    lock = None if args.api_only else _lock(data_dir)  # API processes share no state but the store
    # a clear error for a bad database, or a PostgreSQL server that cannot be reached
    store = open_store(args.store or data_dir / "jobs.db", results, args.db_timeout, **options)
    changed = {}
    if slots:  # (an API-only process leaves the jobs of lost workers to its Reaper)
        store.reset_workers([s.name for s in slots])
        changed = store.recover(results, "server restarted")  # the restart rule, before any worker runs
    for state in ("queued", "failed", "cancelled"):
        ids = [i for i, s in changed.items() if s == state]
        if ids:
            log.warning("interrupted jobs now %s: %s", state, ", ".join(ids))

    config = worker_config(args, data_dir)
    why, fits = check_memory(config, model)
    if why:
        log.info("%s", why)
    pool = WorkerPool(store, config, results, slots, args.worker_timeout, held) if slots else None
    reaper = Reaper(store, results) if store.videos_in_db else None  # PostgreSQL: leases of other hosts too

    def workers_alive() -> dict[str, bool]:  # this pool's by its processes, other pools' by heartbeats
        return {**(fresh_workers(store) if store.videos_in_db else {}), **(pool.alive() if pool else {})}

    settings = ServerSettings(
        results_dir=results, spec=model.spec, queue_size=args.queue_size, api_key=api_key,
        max_prompt_chars=args.max_prompt_chars, max_body_bytes=max_body, limits=limits,
        allowed_hosts=hosts, workers_alive=workers_alive, worker_gpus={s.name: s.label for s in slots}, fits=fits,
        loras=library, max_loras=args.max_loras,
    )  # fmt: skip
    # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again: let that end in `finally` below,
    # which stops the workers and re-queues their jobs, rather than in the default handler's abrupt exit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    if pool is not None:
        pool.start()
    if reaper is not None:
        reaper.start()
    try:
        # bounded graceful shutdown: an open event stream would otherwise hold the server until its job ends
        uvicorn.run(
            create_app(store, settings), host=args.host, port=args.port, log_level=args.log_level,
            timeout_graceful_shutdown=5,
        )  # fmt: skip
    finally:
        if reaper is not None:
            reaper.stop()
        if pool is not None:
            pool.stop()
        if lock is not None:
            lock.close()
    return 0
