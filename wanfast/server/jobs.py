"""The job store: one SQLite database in WAL mode, shared by the web process and the worker process.

States: ``queued -> running -> succeeded | failed | cancelled``, and ``queued -> cancelled``.
A job is accepted (202) only once its row is committed, with ``synchronous=FULL``.

Restart rule, applied when the server starts and whenever the worker process dies:

- queued jobs stay queued, in submission order: the restarted server resumes them;
- a running job whose cancellation was requested becomes ``cancelled``;
- any other running job was interrupted. It goes back to the queue at its original place (generation is
  deterministic in its seed, so the re-run gives the same video), unless it has already been started
  ``max_attempts`` times (3): then it becomes ``failed`` with the reason, so a job that keeps killing the
  worker is not retried forever. A clean shutdown (SIGINT/SIGTERM) re-queues without counting the attempt;
- half-written result files are deleted. A video is written under a temporary name and renamed to
  ``<job id>.mp4`` inside the transaction that marks the job succeeded, so a job has one video or none.

Fencing: each worker start gets a fresh owner token, registered in the ``worker`` row before the process
starts. A claim needs its token to be the registered one and every update of a running job needs the
job's own token, so a worker orphaned by a killed server can neither take jobs nor touch re-queued ones.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
MAX_ATTEMPTS = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- queue order; a re-queued job keeps its place
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    request TEXT NOT NULL,                  -- JSON, as validated by the web process
    params TEXT,                            -- JSON, the SamplingParams the worker resolved and ran
    idempotency_key TEXT UNIQUE,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    updated_at REAL NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER,
    expert TEXT,
    step_seconds REAL,
    eta_seconds REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    note TEXT,
    timings TEXT,
    peak_memory_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS worker (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    owner TEXT,
    pid INTEGER,
    state TEXT NOT NULL,
    detail TEXT,
    device TEXT,
    memory_allocated INTEGER,
    memory_reserved INTEGER,
    memory_total INTEGER,
    heartbeat_at REAL,
    restarts INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO worker (id, state) VALUES (1, 'stopped');
"""


class QueueFull(Exception):
    """The queue holds ``max_queued`` jobs already."""


class NotOwner(Exception):
    """The job is no longer this worker's (a restart re-queued or failed it)."""


@dataclass
class Job:
    seq: int
    id: str
    state: str
    request: dict
    params: dict | None
    idempotency_key: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    step: int
    steps: int | None
    expert: str | None
    step_seconds: float | None
    eta_seconds: float | None
    attempts: int
    owner: str | None
    cancel_requested: bool
    error: str | None
    note: str | None
    timings: dict | None
    peak_memory_bytes: int | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = {f.name: row[f.name] for f in fields(cls)}
        for name in ("request", "params", "timings"):
            values[name] = json.loads(values[name]) if values[name] is not None else None
        values["cancel_requested"] = bool(values["cancel_requested"])
        return cls(**values)


class JobStore:
    """All reads and writes of jobs; safe across threads and processes (SQLite does the locking)."""

    def __init__(self, path: str | Path, max_attempts: int = MAX_ATTEMPTS) -> None:
        self.path = Path(path)
        self.max_attempts = max_attempts
        self._local = threading.local()
        self._con().executescript(_SCHEMA)  # idempotent; executescript manages its own transaction

    # -- plumbing ---------------------------------------------------------------------------------------
    def _con(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            # autocommit mode: every statement is its own transaction unless _tx opens one
            con = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # an accepted job survives a power cut, not just a kill
            self._local.con = con
        return con

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        con = self._con()
        con.execute("BEGIN IMMEDIATE")  # take the write lock now: read-then-write without races
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    def _one(self, sql: str, args: tuple = ()) -> Job | None:
        row = self._con().execute(sql, args).fetchone()
        return Job.from_row(row) if row is not None else None

    # -- web process --------------------------------------------------------------------------------------
    def submit(
        self, request: dict, max_queued: int, idempotency_key: str | None = None, steps: int | None = None
    ) -> tuple[Job, bool]:
        """Queue a job; returns (job, created). The same idempotency key returns the first job again.
        Raises QueueFull when ``max_queued`` jobs are waiting already. ``steps``: the expected total."""
        now = time.time()
        with self._tx() as con:
            if idempotency_key is not None:
                row = con.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    return Job.from_row(row), False
            (queued,) = con.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
            if queued >= max_queued:
                raise QueueFull(f"the queue is full ({queued} jobs waiting); retry later")
            row = con.execute(
                "INSERT INTO jobs (id, state, request, idempotency_key, steps, created_at, updated_at)"
                " VALUES (?, 'queued', ?, ?, ?, ?, ?) RETURNING *",
                (str(uuid.uuid4()), json.dumps(request), idempotency_key, steps, now, now),
            ).fetchone()
        return Job.from_row(row), True

    def get(self, job_id: str) -> Job | None:
        return self._one("SELECT * FROM jobs WHERE id = ?", (job_id,))

    def list(self, state: str | None = None, limit: int = 100, offset: int = 0) -> tuple[list[Job], int]:
        """Jobs newest first, and the total count of the selection."""
        where, args = ("WHERE state = ?", (state,)) if state else ("", ())
        con = self._con()
        (total,) = con.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()
        rows = con.execute(
            f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset)
        )
        return [Job.from_row(r) for r in rows], total

    def queue_position(self, job: Job) -> int | None:
        """0 for the next job to run; None when the job is not queued."""
        if job.state != "queued":
            return None
        sql = "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?"
        return self._con().execute(sql, (job.seq,)).fetchone()[0]

    def counts(self) -> dict[str, int]:
        rows = self._con().execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {state: n for state, n in rows}

    def step_stats(self) -> tuple[float, int, float | None]:
        """(denoising seconds, steps) summed over finished jobs, and the latest job's seconds per step."""
        con = self._con()
        total, count = con.execute(
            "SELECT COALESCE(SUM(step_seconds * step), 0), COALESCE(SUM(step), 0) FROM jobs"
            " WHERE state IN ('succeeded', 'failed', 'cancelled') AND step_seconds IS NOT NULL"
        ).fetchone()
        last = con.execute(
            "SELECT step_seconds FROM jobs WHERE step_seconds IS NOT NULL ORDER BY started_at DESC LIMIT 1"
        ).fetchone()
        return float(total), int(count), (last[0] if last else None)

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled at once; a running one is flagged and its worker stops it at the next
        step. Terminal jobs are left as they are. Returns the job afterwards (None if unknown)."""
        now = time.time()
        with self._tx() as con:
            con.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?,"
                " error = 'cancelled by request before it started' WHERE id = ? AND state = 'queued'",
                (now, now, job_id),
            )
            con.execute(
                "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ? AND state = 'running'",
                (now, job_id),
            )
        return self.get(job_id)

    def recover(self, results_dir: Path | None, reason: str, count_attempt: bool = True) -> dict[str, str]:
        """Apply the restart rule (module docstring) to every running job; call it only while no worker
        runs. Returns {job id: new state}."""
        now, changed = time.time(), {}
        with self._tx() as con:
            for row in con.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall():
                job = Job.from_row(row)
                attempts = job.attempts if count_attempt else job.attempts - 1
                where = f"at step {job.step} of {job.steps or '?'}"
                if job.cancel_requested:
                    state, error, note = "cancelled", f"cancelled by request; {reason} {where}", None
                elif attempts >= self.max_attempts:
                    state, note = "failed", None
                    error = f"interrupted {attempts} times ({reason} {where}); not retried"
                else:
                    state, error, note = "queued", None, f"re-queued: {reason} {where}"
                con.execute(
                    "UPDATE jobs SET state = ?, error = ?, note = COALESCE(?, note), attempts = ?, owner = NULL,"
                    " step = CASE WHEN ? = 'queued' THEN 0 ELSE step END, eta_seconds = NULL, updated_at = ?,"
                    " started_at = CASE WHEN ? = 'queued' THEN NULL ELSE started_at END,"
                    " finished_at = CASE WHEN ? = 'queued' THEN NULL ELSE ? END WHERE id = ?",
                    (state, error, note, attempts, state, now, state, state, now, job.id),
                )
                changed[job.id] = state
        if results_dir is not None:
            for tmp in Path(results_dir).glob("*.tmp.mp4"):
                tmp.unlink(missing_ok=True)
        return changed

    # -- worker registration ------------------------------------------------------------------------------
    def register_worker(self, owner: str | None) -> None:
        """Make ``owner`` the only token that may claim jobs (None: nobody may)."""
        self._con().execute(
            "UPDATE worker SET owner = ?, pid = NULL, state = ?, detail = NULL, heartbeat_at = ? WHERE id = 1",
            (owner, "starting" if owner else "stopped", time.time()),
        )

    def count_worker_restart(self) -> None:
        self._con().execute("UPDATE worker SET restarts = restarts + 1 WHERE id = 1")

    def heartbeat(self, owner: str, state: str, **info: object) -> bool:
        """Record the worker's state (and pid, device, memory_*); False once the worker is fenced off."""
        allowed = {"pid", "detail", "device", "memory_allocated", "memory_reserved", "memory_total"}
        cols = "".join(f", {k} = :{k}" for k in info if k in allowed)
        cur = self._con().execute(
            f"UPDATE worker SET state = :state, heartbeat_at = :now{cols} WHERE id = 1 AND owner = :owner",
            {**info, "state": state, "now": time.time(), "owner": owner},
        )
        return cur.rowcount == 1

    def worker_status(self) -> dict:
        return dict(self._con().execute("SELECT * FROM worker WHERE id = 1").fetchone())

    # -- worker process -----------------------------------------------------------------------------------
    def claim(self, owner: str) -> Job | None:
        """Atomically take the oldest queued job, if ``owner`` is the registered worker."""
        now = time.time()
        return self._one(
            "UPDATE jobs SET state = 'running', owner = ?1, attempts = attempts + 1, started_at = ?2,"
            " updated_at = ?2, step = 0 WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq"
            " LIMIT 1) AND (SELECT owner FROM worker WHERE id = 1) = ?1 RETURNING *",
            (owner, now),
        )

    def _update_running(self, job_id: str, owner: str, sets: str, args: dict) -> sqlite3.Row:
        row = (
            self._con()
            .execute(
                f"UPDATE jobs SET {sets}, updated_at = :now WHERE id = :id AND owner = :owner"
                " AND state = 'running' RETURNING cancel_requested",
                {**args, "now": time.time(), "id": job_id, "owner": owner},
            )
            .fetchone()
        )
        if row is None:
            raise NotOwner(f"job {job_id} is no longer owned by this worker")
        return row

    def start(self, job_id: str, owner: str, params: dict) -> None:
        """Record the parameters the worker resolved (the checkpoint's own defaults filled in)."""
        self._update_running(
            job_id,
            owner,
            "params = :params, steps = :steps",
            {"params": json.dumps(params), "steps": params["steps"]},
        )

    def progress(
        self, job_id: str, owner: str, step: int, steps: int, expert: str, step_s: float, eta_s: float
    ) -> bool:
        """Record step ``step`` of ``steps``; returns True when cancellation was requested."""
        sets = "step = :step, steps = :steps, expert = :expert, step_seconds = :step_s, eta_seconds = :eta_s"
        args = {"step": step, "steps": steps, "expert": expert, "step_s": step_s, "eta_s": eta_s}
        return bool(self._update_running(job_id, owner, sets, args)["cancel_requested"])

    def finish(
        self,
        job_id: str,
        owner: str,
        state: str,
        error: str | None = None,
        timings: dict | None = None,
        peak_memory_bytes: int | None = None,
        result: tuple[Path, Path] | None = None,
    ) -> None:
        """End a running job. ``result`` = (temporary file, final path) is renamed inside the transaction,
        so the video appears exactly when the job becomes succeeded. Raises NotOwner if fenced off."""
        if state not in TERMINAL:
            raise ValueError(f"not a final state: {state!r}")
        try:
            with self._tx() as con:
                row = con.execute(
                    "UPDATE jobs SET state = ?, error = ?, timings = ?, peak_memory_bytes = ?, finished_at = ?,"
                    " updated_at = ?, eta_seconds = NULL WHERE id = ? AND owner = ? AND state = 'running'"
                    " RETURNING id",
                    (state, error, json.dumps(timings) if timings else None, peak_memory_bytes,
                     time.time(), time.time(), job_id, owner),
                ).fetchone()  # fmt: skip
                if row is None:
                    raise NotOwner(f"job {job_id} is no longer owned by this worker")
                if result is not None:
                    # should COMMIT fail now, the job stays running: the restart rule re-queues it, and its
                    # re-run overwrites this same file
                    result[0].replace(result[1])
        finally:
            if result is not None:
                result[0].unlink(missing_ok=True)
