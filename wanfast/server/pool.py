"""The worker pool: one worker per GPU, or per group of K GPUs, each in its own slot, supervised.

A slot runs one worker: one process (``python -m wanfast.server.worker``), or K processes that split each
video (CFG-parallel, then Ulysses, over the slot's K GPUs: ``slot_split``); the slot's GPUs are the only
ones its processes see (``CUDA_VISIBLE_DEVICES``). Every worker loads the models once and claims the next
queued job atomically from the job store, so N slots run N videos at once.

Each slot has a thread here that starts its worker, watches it and restarts it:

- liveness: every worker process writes a heartbeat line to its stdout pipe every second
  (``worker.HEARTBEAT_SECONDS``), from a thread of its own, so a long step or compile never looks
  dead. A process that exits, or gives no heartbeat for ``hang_seconds`` (a SIGSTOP, a frozen process;
  ``START_GRACE_SECONDS`` before its first), ends the whole slot: every process of the slot is killed;
- then, before the slot's next worker starts: its old token is fenced off and the restart rule of
  ``wanfast.server.jobs`` is applied to its job. A store that cannot be written at that moment (locked,
  full) is retried every second until it can: no worker starts in the slot before its last job has been
  re-queued, failed or cancelled by the rule, so no job is left ``running`` with nobody to run it;
- restarts back off (1, 2, 4, ... 60 s) while a worker keeps dying within a minute of its start.
The other slots keep running throughout.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wanfast.config import ConfigError
from wanfast.server.jobs import STORE_ERRORS, JobStore

log = logging.getLogger("wanfast.server.pool")
HANG_SECONDS = 30.0  # no heartbeat this long: the worker is hung (SIGSTOP included) and is replaced
START_GRACE_SECONDS = 120.0  # for the first heartbeat: interpreter start and imports on a busy host
_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Slot:
    """One worker of the pool: its name, the GPUs it owns (None: CPU or the default device) and the
    processes it runs (one per GPU of a group; on the CPU, gloo processes)."""

    name: str
    gpus: tuple[int, ...] | None = None
    ranks: int = 1

    @property
    def label(self) -> str:
        return ",".join(map(str, self.gpus)) if self.gpus is not None else ""


def parse_gpus(text: str) -> list[int]:
    """``"0,1,2,3"`` -> [0, 1, 2, 3]; each a distinct CUDA device index."""
    try:
        ids = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--gpus takes device indices like 0,1,2,3, got {text!r}") from None
    if not ids or any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--gpus takes distinct device indices >= 0, like 0,1,2,3, got {text!r}")
    return ids


def plan_slots(gpus: list[int] | None, per_worker: int = 1, workers: int | None = None) -> list[Slot]:
    """The pool's slots: ``gpus`` in groups of ``per_worker`` (one worker each; ``workers``, if given, must
    match); without ``gpus``, ``workers`` slots (default 1) of ``per_worker`` processes on the default
    device: the CPU, or the GPU each process picks."""
    if per_worker < 1 or (workers is not None and workers < 1):
        raise ConfigError("--workers and --gpus-per-worker must be >= 1")
    if gpus is None:
        return [Slot(f"w{i}", None, per_worker) for i in range(workers or 1)]
    if len(gpus) % per_worker:
        raise ConfigError(f"--gpus lists {len(gpus)} GPUs, not a multiple of --gpus-per-worker {per_worker}")
    groups = [tuple(gpus[i : i + per_worker]) for i in range(0, len(gpus), per_worker)]
    if workers is not None and workers != len(groups):
        raise ConfigError(
            f"--workers {workers} does not match --gpus: {len(groups)} worker(s) of {per_worker}"
        )
    return [Slot(f"w{i}", g, per_worker) for i, g in enumerate(groups)]


def slot_split(ranks: int) -> dict:
    """The split of one video over a slot's ``ranks`` processes: CFG-parallel first (the two passes of a
    guided step on two halves: 1.985x on two H200s at 720p, against 1.897x for Ulysses 2), then Ulysses
    over the rest; an odd count is Ulysses alone."""
    if ranks == 1:
        return {}
    if ranks % 2:
        return {"cfg_parallel": False, "ulysses": ranks}
    return {"cfg_parallel": True, "ulysses": ranks // 2}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process:
    """One worker process and the time of its last heartbeat line."""

    def __init__(self, cmd: list[str], env: dict) -> None:
        # own session: a Ctrl-C in the terminal reaches the server, which then stops the worker itself
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True, env=env
        )
        self.started = self.last_beat = time.monotonic()
        self.beats = 0
        threading.Thread(target=self._read, name=f"heartbeat-{self.proc.pid}", daemon=True).start()

    def _read(self) -> None:
        for _ in self.proc.stdout:  # one line a second; EOF when the process ends
            self.last_beat, self.beats = time.monotonic(), self.beats + 1

    def silent_for(self) -> float:
        return time.monotonic() - self.last_beat

    def assign(self, message: dict) -> None:
        """Give the process its job as a worker: one JSON line on its stdin (``worker._assignment``). A
        process launched ahead (``Held``) has imported while it waited; its heartbeat clock starts now."""
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()
        self.started = self.last_beat = time.monotonic()

    def stop(self, timeout: float) -> None:
        """Close its stdin (it exits at once), then kill it if it has not within ``timeout``."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # SIGKILL ends a stopped (SIGSTOP) process too
        self.proc.wait()


def launch(slot: Slot, data_dir: str | Path) -> list[_Process]:
    """The slot's processes: each imports what every worker needs, then waits for its assignment on stdin
    (``_Process.assign``); EOF there ends it having loaded nothing. Its command line names only where and
    who it is (``ps``; ``server.testing`` finds workers by it)."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV}
    if slot.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.label
    port = _free_port() if slot.ranks > 1 else 0
    procs = []
    for rank in range(slot.ranks):
        if slot.ranks > 1:  # the environment torchrun would give (wanfast.parallel.init_distributed)
            env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(slot.ranks),
                   "LOCAL_WORLD_SIZE": str(slot.ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        where, who = json.dumps({"data_dir": str(data_dir)}), json.dumps({"name": slot.name, "rank": rank})
        procs.append(_Process([sys.executable, "-m", "wanfast.server.worker", where, who], env))
    return procs


class Held:
    """Worker processes launched before the server has checked its flags and the model (``prelaunched``):
    their interpreter start and imports (seconds: torch, transformers) overlap the server's own. They
    touch no GPU, file or job store until the pool assigns them a slot; ``close`` kills the ones it
    did not take (a failed check, a stop)."""

    def __init__(self, slots: list[Slot], data_dir: str | Path) -> None:
        self._procs = [(s, launch(s, data_dir)) for s in slots]

    def take(self, slot: Slot) -> list[_Process] | None:
        """The processes launched for ``slot``, once; None when none were, or one has died."""
        for i, (launched, procs) in enumerate(self._procs):
            if launched == slot:
                del self._procs[i]
                if all(p.proc.poll() is None for p in procs):
                    return procs
                for p in procs:
                    p.kill()
                return None
        return None

    def close(self) -> None:
        for _, procs in self._procs:
            for p in procs:
                p.kill()  # nothing to lose: they only imported
        self._procs = []


class WorkerPool:
    """The slots' supervisor threads, in the web process (or in ``generate --gpus``)."""

    def __init__(
        self,
        store: JobStore,
        config: dict,
        results_dir: Path,
        slots: list[Slot],
        hang_seconds: float = HANG_SECONDS,
        held: Held | None = None,
    ) -> None:
        self.store, self.config, self.results_dir, self.slots = store, config, results_dir, slots
        self._held = held  # launched ahead for these slots, taken at first spawn; its owner closes it
        self.hang_seconds = hang_seconds
        self._stop = threading.Event()
        self._procs: dict[str, list[_Process]] = {s.name: [] for s in slots}
        self._owners: dict[str, str] = {}  # slot -> the token of its current worker
        self._threads = [threading.Thread(target=self._run, args=(s,), name=f"pool-{s.name}", daemon=True)
                         for s in slots]  # fmt: skip
        cpu_procs = sum(s.ranks for s in slots)
        # CPU workers share the cores; one is left to the web process
        self._threads_per_proc = max(1, ((os.cpu_count() or 2) - 1) // cpu_procs)

    def start(self) -> None:
        self.store.reset_workers([s.name for s in self.slots])
        for t in self._threads:
            t.start()

    def alive(self) -> dict[str, bool]:
        """Slot name -> whether all its processes run."""
        return {n: bool(ps) and all(p.proc.poll() is None for p in ps) for n, ps in self._procs.items()}

    # -- one slot -----------------------------------------------------------------------------------------
    def _retry(self, what: str, fn: Callable[[], object]) -> object:
        """``fn()``, again every second while the store cannot be written (e.g. locked by another process
        for longer than its timeout, or a full disk), until it succeeds or the pool stops."""
        while True:
            try:
                return fn()
            except STORE_ERRORS as e:
                log.error("%s: the job store failed (%s); retrying in 1 s", what, e)
                if self._stop.wait(1.0):
                    raise

    def _spawn(self, slot: Slot, owner: str) -> list[_Process]:
        cfg = {**self.config, **slot_split(slot.ranks)}
        env = {}
        if self.config.get("store") == "env":  # a PostgreSQL URL: never in a command line
            env["WANFAST_STORE"] = str(self.store.path)
        procs = (self._held.take(slot) if self._held is not None else None) or launch(slot, cfg["data_dir"])
        try:
            for rank, p in enumerate(procs):
                info = {"owner": owner, "name": slot.name, "rank": rank, "world": slot.ranks,
                        "threads": self._threads_per_proc}  # fmt: skip
                p.assign({"cfg": cfg, "slot": info, "env": env})
        except OSError:  # one died before its line (a broken pipe): the slot's others must not wait on
            for p in procs:
                p.kill()
            raise
        return procs

    def _watch(self, slot: Slot, procs: list[_Process]) -> str:
        """Wait until a process of the slot ends or hangs (or the pool stops); returns why, for the rule."""
        while not self._stop.wait(0.2):
            for rank, p in enumerate(procs):
                who = f"worker {slot.name}" + (f" rank {rank}" if slot.ranks > 1 else "")
                code = p.proc.poll()
                if code is not None:
                    return f"{who} exited with code {code}"
                limit = self.hang_seconds if p.beats else max(self.hang_seconds, START_GRACE_SECONDS)
                if p.silent_for() > limit:
                    log.error("%s (pid %d) gave no heartbeat for %.0f s: killing it", who, p.proc.pid, limit)
                    return f"{who} hung (no heartbeat for {limit:g} s)"
        return "server stopped"

    def _restart_rule(self, slot: Slot, owner: str, why: str) -> None:
        """Fence the slot's old token, then apply the restart rule to its job (each retried until the store
        takes it): before the slot's next worker starts."""
        self._retry(f"fencing {slot.name}", lambda: self.store.register_worker(slot.name, None))
        changed = self._retry(
            f"restart rule for {slot.name}", lambda: self.store.recover(self.results_dir, why, owner=owner)
        )
        self._retry(f"counting {slot.name}", lambda: self.store.count_worker_restart(slot.name))
        log.error("%s; restart rule applied to %s", why, changed or "no job")

    def _run(self, slot: Slot) -> None:
        failures, owner, why, started = 0, None, "", time.monotonic()
        while not self._stop.is_set():
            try:
                if owner is not None:
                    self._restart_rule(slot, owner, why)
                    owner = None
                    failures = failures + 1 if time.monotonic() - started < 60 else 1
                    backoff = min(2.0 ** (failures - 1), 60.0)  # a worker that cannot even load must not spin
                    if self._stop.wait(backoff):
                        break
                owner = self._owners[slot.name] = uuid.uuid4().hex
                self._retry(
                    f"registering {slot.name}", lambda o=owner: self.store.register_worker(slot.name, o)
                )
                started = time.monotonic()
                procs = self._procs[slot.name] = self._spawn(slot, owner)
                why = self._watch(slot, procs)
                if not self._stop.is_set():  # one process gone or hung: the slot's others cannot go on
                    for p in procs:
                        p.kill()
            except STORE_ERRORS:
                break  # only while stopping: _retry gave up
            except Exception:  # this thread must outlive any error: it is the only one that restarts workers
                log.exception("could not run worker %s", slot.name)
                why = f"worker {slot.name} could not be started"
                self._stop.wait(5.0)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every worker (closing its stdin ends it) and re-queue their jobs without counting an
        attempt."""
        self._stop.set()
        for t in self._threads:  # each returns within a watch interval; none starts a process after
            t.join(timeout)
        procs = [p for ps in self._procs.values() for p in ps]
        for p in procs:  # all at once: a worker exits as soon as its stdin closes
            if p.proc.poll() is None:
                try:
                    p.proc.stdin.close()
                except OSError:
                    pass
        deadline = time.monotonic() + timeout
        for p in procs:
            p.stop(max(0.1, deadline - time.monotonic()))
        try:
            for slot in self.slots:
                self.store.register_worker(slot.name, None)
            for owner in self._owners.values():  # this pool's jobs only: a shared store has others'
                self.store.recover(self.results_dir, "server stopped", count_attempt=False, owner=owner)
        except STORE_ERRORS as e:  # the next start applies the rule (counting the attempt)
            log.error("could not re-queue the running jobs at stop: %s", e)
