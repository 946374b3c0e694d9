"""Beyond one host: the roles of ``wanfast serve`` split over processes that share a PostgreSQL job store.

- ``wanfast serve --store postgresql://...``: web process and worker pool, as on one host, but any number
  of them, on any hosts, share the queue;
- ``wanfast serve --api-only --store postgresql://...``: HTTP only, no worker (a GPU-less host behind a
  load balancer); its ``/health`` and ``/metrics`` show every pool's workers, by their heartbeats;
- ``wanfast worker --store postgresql://...``: a worker pool only (one worker per GPU, as ``serve``).

Every one of them runs a ``Reaper``: once a second it applies the restart rule to the running jobs whose
lease has expired (a worker, or a whole host, gone without anybody left to fence it off;
``wanfast.server.jobs``), so a job of a vanished host is re-queued (or failed, on its third start) within
the lease plus a second, whatever process is still alive. Worker slots are named ``<pool>-w0``,
``<pool>-w1``, ... with ``--pool-name`` (default: host name and process id), unique across the store.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from wanfast.config import ConfigError
from wanfast.server.storedb import STORE_ERRORS, is_postgres, redact_url

if TYPE_CHECKING:  # the pool module is imported where a pool starts
    from wanfast.server.pool import Held

log = logging.getLogger("wanfast.server.scale")
REAP_SECONDS = 1.0
STORE_ENV = "WANFAST_STORE"
HEARTBEAT_FRESH_SECONDS = 10.0  # a worker row beating more recently than this counts as alive (app.py too)


def add_store_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job store")
    g.add_argument("--store", default=None, metavar="URL",
                   help="postgresql://user@host:port/db: a PostgreSQL job store shared by any number of servers "
                   "and workers on any hosts (default: $WANFAST_STORE, else the SQLite file DATA_DIR/jobs.db)")  # fmt: skip
    g.add_argument("--lease-seconds", type=float, default=30.0, metavar="S",
                   help="PostgreSQL: a job whose worker gave no heartbeat for S seconds is re-queued (default 30)")  # fmt: skip
    g.add_argument("--max-video-mb", type=float, default=256.0, metavar="MB",
                   help="PostgreSQL: largest video kept in the database; a larger one fails its job (default 256)")  # fmt: skip
    g.add_argument("--pool-name", default=None, metavar="NAME",
                   help="PostgreSQL: this pool's workers are NAME-w0, NAME-w1, ... (default: host name and pid)")  # fmt: skip


def resolve_store(args: argparse.Namespace) -> None:
    """``--store``, else ``$WANFAST_STORE`` (prefer the variable for a URL with a password: ``ps`` shows
    flags). The pool hands a PostgreSQL URL to its worker processes the same way, by their environment
    (``server.pool``), without changing this process's own."""
    args.store = args.store or os.environ.get(STORE_ENV) or None


def store_options(args: argparse.Namespace) -> dict:
    """``JobStore`` keyword arguments from the flags of ``add_store_flags``."""
    if args.lease_seconds <= 0 or args.max_video_mb <= 0:
        raise ConfigError("--lease-seconds and --max-video-mb must be > 0")
    return {"lease_seconds": args.lease_seconds, "max_video_bytes": int(args.max_video_mb * 2**20)}


def require_postgres(args: argparse.Namespace, what: str) -> str:
    if args.store is None or not is_postgres(args.store):
        raise ConfigError(
            f"{what} needs a shared job store: --store postgresql://user@host:port/db (on one host with "
            "SQLite, `wanfast serve` runs the web process and the workers together)"
        )
    return args.store


def pool_slots(args: argparse.Namespace, slots: list) -> list:
    """The slots with names unique across the store: ``<pool name>-w0``, ... (PostgreSQL only)."""
    if args.store is None or not is_postgres(args.store):
        return slots
    prefix = args.pool_name or f"{socket.gethostname()}-{os.getpid()}"
    return [replace(s, name=f"{prefix}-{s.name}") for s in slots]


def fresh_workers(store) -> dict[str, bool]:
    """Worker name -> it gave a heartbeat within ``HEARTBEAT_FRESH_SECONDS``: how a process that does not
    run a worker itself judges the others'."""
    now = time.time()
    return {
        w["name"]: w["heartbeat_at"] is not None and now - w["heartbeat_at"] < HEARTBEAT_FRESH_SECONDS
        for w in store.workers()
    }


class Reaper:
    """A thread applying the restart rule to jobs whose lease has expired, every ``interval`` seconds."""

    def __init__(self, store, results_dir: Path | None, interval: float = REAP_SECONDS) -> None:
        self.store, self.results_dir, self.interval = store, results_dir, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self.reason = "the lease of worker {worker} expired (no heartbeat)"

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                changed = self.store.recover(self.results_dir, self.reason, expired=True)
            except STORE_ERRORS as e:  # the database away: try again at the next tick
                log.warning("reaper: the job store failed (%s)", e)
                continue
            if changed:
                log.error("lease expired; restart rule applied to %s", changed)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _exit_cleanly(signum: int, frame) -> None:
    raise SystemExit(0)


def register(sub: argparse._SubParsersAction) -> None:
    from wanfast.flags import add_engine_flags, add_model_source
    from wanfast.server.cli import add_pool_flags

    p = sub.add_parser("worker", help="run a worker pool on a shared PostgreSQL job store, no HTTP")
    p.set_defaults(func=worker_main)
    add_model_source(p)
    p.add_argument("--data-dir", type=Path, default=Path("wanfast-data"),
                   help="this host's scratch: videos being written, worker logs (default wanfast-data)")  # fmt: skip
    add_engine_flags(p)
    add_pool_flags(p)  # the pool flags of `wanfast serve`, LoRA library and warm sizes included
    add_store_flags(p)


def worker_main(args: argparse.Namespace) -> int:
    """``wanfast worker``: the pool of ``wanfast serve`` without its web process, until SIGINT/SIGTERM."""
    from wanfast.server.cli import prelaunched

    resolve_store(args)
    url = require_postgres(args, "wanfast worker")
    options = store_options(args)
    with prelaunched(args) as held:
        return _worker_pool(args, url, options, held)


def _worker_pool(args: argparse.Namespace, url: str, options: dict, held: Held | None) -> int:
    from wanfast.builder import open_model, plan
    from wanfast.flags import engine_settings
    from wanfast.server.cli import _lock, _pool_plan, check_pool_args, worker_config
    from wanfast.server.jobs import open_store
    from wanfast.server.pool import WorkerPool

    model = open_model(args.model or args.ckpt_dir)  # a wrong folder fails here, not in a restart loop
    plan(model, engine_settings(args))
    check_pool_args(args, model)
    slots = pool_slots(args, _pool_plan(args, model.spec.dit.num_heads))
    if min(args.worker_timeout, args.db_timeout) <= 0:
        raise ConfigError("--worker-timeout and --db-timeout must be > 0")
    logging.getLogger("wanfast").setLevel(logging.INFO)
    data_dir = args.data_dir.resolve()
    results = data_dir / "results"
    results.mkdir(parents=True, exist_ok=True)
    store = open_store(url, results, args.db_timeout, **options)  # a server it cannot reach: a clear error
    lock = _lock(data_dir)  # one pool per data folder: the slots' scratch folders are named alike
    pool = WorkerPool(store, worker_config(args, data_dir), results, slots, args.worker_timeout, held)
    reaper = Reaper(store, results)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    log.info("worker pool %s on %s", ", ".join(s.name for s in slots), redact_url(url))
    pool.start()
    reaper.start()
    try:
        while True:
            signal.pause()  # until SIGINT/SIGTERM ends the process through _exit_cleanly
    finally:
        reaper.stop()
        pool.stop()
        lock.close()
    return 0
