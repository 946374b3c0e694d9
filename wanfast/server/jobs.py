"""The job store: one SQLite database in WAL mode, shared by the web process and the worker processes of
one host; or one PostgreSQL database, shared by any number of web processes and worker pools on any hosts
(``wanfast.server.storedb`` holds what differs between the two).

States: ``queued -> running -> succeeded | failed | cancelled``, and ``queued -> cancelled``.
A job is accepted (202) only once its row is committed, with ``synchronous=FULL``. A running job also has
a ``stage``: ``text_encoding``, ``denoising``, ``decoding`` (the VAE), ``writing`` (the MP4).

Restart rule, applied when the server starts and before every worker (re)start, to the running jobs of
workers that are gone:

- queued jobs stay queued, in submission order: the restarted server resumes them;
- a running job whose cancellation was requested becomes ``cancelled``;
- any other running job was interrupted. It goes back to the queue at its original place (generation is
  deterministic in its seed, so the re-run gives the same video), unless it has already been started
  ``max_attempts`` times (3): then it becomes ``failed`` with the reason, so a job that keeps killing a
  worker is not retried forever. A clean shutdown (SIGINT/SIGTERM) re-queues without counting the attempt;
- half-written result files are deleted. A video is written under a temporary name, flushed to disk
  (fsync of the file and of its directory) and renamed to ``<job id>.mp4`` inside the transaction that
  marks the job succeeded, so a job has one video or none, also after a power cut.

Fencing: every worker process gets a fresh owner token, registered in its row of ``workers`` before the
process starts and removed before the restart rule runs for it. A claim needs a registered token, and
every update of a running job needs the job's own token, so a worker that was replaced (or orphaned by a
killed server) can neither take jobs nor touch re-queued ones.

Leases: a claimed job is its worker's until ``lease_expires``, which every heartbeat and step renews. A
job whose lease has expired counts as one of a gone worker, whatever its token: so the rule reaches the
job of a host that vanished with nobody left to fence it (``server.scale.Reaper``). On PostgreSQL videos
are rows of the database, written in the transaction that marks the job succeeded (``server.videos``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from wanfast.config import ConfigError
from wanfast.server import videos
from wanfast.server.jobdb import Job, migrate
from wanfast.server.safety import redact_paths
from wanfast.server.storedb import STORE_ERRORS, Connection, Database, is_postgres
from wanfast.server.workertable import WorkerTable

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
MAX_ATTEMPTS = 3
MAX_OVERTAKEN = 4  # most newer jobs a queued job lets go first for sharing their LoRA set with a worker
LOCK_TIMEOUT = 30.0  # seconds a statement waits for another process's write lock before it fails
LEASE_SECONDS = 30.0  # a claimed job's lease: renewed every second by its worker's heartbeat

# a running job's worker is gone: fenced off (token not registered), or silent past the job's lease
_GONE = (
    "(owner IS NULL OR owner NOT IN (SELECT owner FROM workers WHERE owner IS NOT NULL)"
    " OR lease_expires < :now)"
)
__all__ = ["STORE_ERRORS", "Job", "JobStore", "open_store"]


class QueueFull(Exception):
    """The queue holds ``max_queued`` jobs already."""


class NotOwner(Exception):
    """The job is no longer this worker's (a restart re-queued or failed it)."""


class IdempotencyConflict(Exception):
    """An ``Idempotency-Key`` that was used before, for a different request."""


def open_store(path: str | Path, results_dir: Path, timeout: float = LOCK_TIMEOUT, **options) -> JobStore:
    """The server's store, checked at start: a database that cannot be read, or one that is new or empty
    while ``results_dir`` holds videos of earlier jobs (the jobs were lost), is a ``ConfigError`` that
    names the file and the way out, never a traceback or a silent fresh start. ``path``: a SQLite file, or
    a ``postgresql://`` URL (a server that cannot be reached is a ``ConfigError`` too). ``options``: of
    ``JobStore``."""
    if is_postgres(path):
        Database(path, timeout).check()
        return JobStore(path, timeout=timeout, **options)
    path = Path(path)
    new = not path.exists() or path.stat().st_size == 0
    found = [p for p in results_dir.glob("*.mp4") if not p.name.endswith(".tmp.mp4")]
    if new and found:
        what = "is empty" if path.exists() else "is missing"
        raise ConfigError(
            f"{path} {what} but {results_dir} holds {len(found)} video(s) of earlier jobs: the job "
            f"database was lost. Restore it from a backup, or move {results_dir} aside to start with an "
            "empty job list"
        )
    way_out = (
        f"restore it from a backup, or move it aside (with any {path.name}-wal and {path.name}-shm beside "
        "it) to start with an empty job list"
    )
    try:
        store = JobStore(path, timeout=timeout, **options)
        problems = [r[0] for r in store._con().execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"{path} is not a readable job database ({e}): {way_out}") from None
    if problems != ["ok"]:
        raise ConfigError(f"{path} is damaged ({'; '.join(problems[:3])}): {way_out}")
    return store


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a directory too: its entry for a renamed file
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JobStore(WorkerTable):
    """All reads and writes of jobs; safe across threads and processes (the database does the locking).
    ``path``: a SQLite file or a ``postgresql://user@host:port/db`` URL. ``timeout``: seconds a statement
    waits for another process's lock before it raises. ``lease_seconds``: of a claimed job (module
    docstring). ``max_video_bytes``: the largest video a PostgreSQL store keeps (``wanfast.server.videos``);
    a larger one fails its job."""

    def __init__(
        self,
        path: str | Path,
        max_attempts: int = MAX_ATTEMPTS,
        timeout: float = LOCK_TIMEOUT,
        lease_seconds: float = LEASE_SECONDS,
        max_video_bytes: int = videos.MAX_VIDEO_BYTES,
    ) -> None:
        self.db = Database(path, timeout)
        self.path, self.max_attempts, self.timeout = self.db.target, max_attempts, timeout
        self.lease_seconds, self.max_video_bytes = lease_seconds, max_video_bytes
        migrate(self.db)

    @property
    def videos_in_db(self) -> bool:
        """Videos are rows of the database (PostgreSQL), not files of the results folder (SQLite)."""
        return self.db.postgres

    # -- plumbing ---------------------------------------------------------------------------------------
    def _con(self) -> Connection:
        return self.db.con()  # autocommit: every statement is its own transaction unless _tx opens one

    @contextmanager
    def _tx(self, exclusive: bool = False) -> Iterator[Connection]:
        with self.db.begin(exclusive) as con:
            yield con

    def _one(self, sql: str, args: tuple = ()) -> Job | None:
        row = self._con().execute(sql, args).fetchone()
        return Job.from_row(row) if row is not None else None

    # -- web process --------------------------------------------------------------------------------------
    def submit(
        self, request: dict, max_queued: int, idempotency_key: str | None = None, steps: int | None = None
    ) -> tuple[Job, bool]:
        """Queue a job; returns (job, created). The same idempotency key with the same request returns the
        first job again; with another request it raises ``IdempotencyConflict``. Raises QueueFull when
        ``max_queued`` jobs are waiting already. ``steps``: the expected total."""
        now, body = time.time(), json.dumps(request)
        with self._tx(exclusive=True) as con:  # the count and the insert as one: the queue bound holds
            if idempotency_key is not None:
                row = con.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    first = Job.from_row(row)
                    if first.request != json.loads(body):
                        raise IdempotencyConflict(
                            f"Idempotency-Key {idempotency_key!r} was used for a different request (job "
                            f"{first.id}); send a new key for a new request"
                        )
                    return first, False
            (queued,) = con.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()
            if queued >= max_queued:
                raise QueueFull(f"the queue is full ({queued} jobs waiting); retry later")
            row = con.execute(
                "INSERT INTO jobs (id, state, request, idempotency_key, steps, created_at, updated_at)"
                " VALUES (?, 'queued', ?, ?, ?, ?, ?) RETURNING *",
                (str(uuid.uuid4()), body, idempotency_key, steps, now, now),
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
        """A queued job is cancelled at once; a running one is flagged: its worker stops it at the next
        step, or discards its video if it is past the last step (``finish``). Terminal jobs are left as
        they are. Returns the job afterwards (None if unknown)."""
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

    def recover(
        self,
        results_dir: Path | None,
        reason: str,
        count_attempt: bool = True,
        owner: str | None = None,
        expired: bool = False,
    ) -> dict[str, str]:
        """Apply the restart rule (module docstring) to the running jobs whose worker is gone (their owner
        token is not registered, or their lease has expired), or only to those of ``owner``; ``expired``:
        only to those whose lease has expired (the reaper: a fenced worker's job is its pool's to recover,
        with the pool's reason). ``{worker}`` in ``reason`` becomes each job's worker name. Returns {job id:
        new state}."""
        now, changed = time.time(), {}
        gone = "lease_expires < :now" if expired else _GONE
        where = f"state = 'running' AND {gone}" + (" AND owner = :owner" if owner else "")
        lock = " FOR UPDATE" if self.db.postgres else ""  # a second reaper waits, then skips these rows
        with self._tx() as con:
            rows = con.execute(f"SELECT * FROM jobs WHERE {where}{lock}", {"now": now, "owner": owner})
            for row in rows.fetchall():
                job = Job.from_row(row)
                attempts = job.attempts if count_attempt else job.attempts - 1
                at = f"at step {job.step} of {job.steps or '?'}"
                why = reason.replace("{worker}", job.worker or "?")  # the reaper names each job's worker
                if job.cancel_requested:
                    state, error, note = "cancelled", f"cancelled by request; {why} {at}", None
                elif attempts >= self.max_attempts:
                    state, note = "failed", None
                    error = f"interrupted {attempts} times ({why} {at}); not retried"
                else:
                    state, error, note = "queued", None, f"re-queued: {why} {at}"
                con.execute(
                    "UPDATE jobs SET state = :state, error = :error, note = COALESCE(:note, note), owner = NULL,"
                    " attempts = :attempts, stage = NULL, eta_seconds = NULL, lease_expires = NULL,"
                    " step = CASE WHEN :state = 'queued' THEN 0 ELSE step END, updated_at = :now,"
                    " started_at = CASE WHEN :state = 'queued' THEN NULL ELSE started_at END,"
                    " finished_at = CASE WHEN :state = 'queued' THEN NULL ELSE :now END WHERE id = :id",
                    dict(state=state, error=error, note=note, attempts=attempts, now=now, id=job.id),
                )
                changed[job.id] = state
        if results_dir is not None:  # half-written videos of jobs no live worker runs
            for tmp in Path(results_dir).glob("*.tmp.mp4"):
                job = self.get(tmp.name[: -len(".tmp.mp4")])
                if job is None or job.state != "running" or job.id in changed:
                    tmp.unlink(missing_ok=True)
        return changed

    # -- worker process -----------------------------------------------------------------------------------
    def claim(self, owner: str, prefer: str | None = None, max_overtaken: int = MAX_OVERTAKEN) -> Job | None:
        """Atomically take the oldest queued job, if ``owner`` is a registered worker token. ``prefer``: the
        LoRA set the worker holds (``lora_library.set_key``): the oldest queued job with that set is taken
        instead (no weight switch), unless the oldest queued job has already been overtaken by
        ``max_overtaken`` newer jobs: then the oldest goes (no starvation). Overtakers are counted as the
        newer jobs that have started, so the count survives worker restarts and needs no extra column."""
        now = time.time()
        args = {"owner": owner, "now": now, "lease": now + self.lease_seconds}
        take = (
            "UPDATE jobs SET state = 'running', owner = :owner, attempts = attempts + 1, started_at = :now,"
            " updated_at = :now, step = 0, stage = 'starting', lease_expires = :lease,"
            " worker = (SELECT name FROM workers WHERE owner = :owner)"
            " WHERE id = {pick} AND state = 'queued' AND EXISTS (SELECT 1 FROM workers WHERE owner = :owner)"
            " RETURNING *"
        )
        if prefer is None:
            lock = self.db.dialect.skip_locked  # PostgreSQL: skip a job another claim holds
            oldest = f"(SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1{lock})"
            return self._one(take.format(pick=oldest), args)
        from wanfast.server.lora_library import set_key

        with self._tx(exclusive=True) as con:  # pick and take under one write lock
            rows = con.execute(
                "SELECT id, seq, request FROM jobs WHERE state = 'queued' ORDER BY seq"
            ).fetchall()
            if not rows:
                return None
            pick = rows[0]["id"]
            match = next((r for r in rows if set_key(json.loads(r["request"])) == prefer), None)
            if match is not None and match["id"] != pick:
                overtaken = con.execute(
                    "SELECT COUNT(*) FROM jobs WHERE seq > ? AND started_at IS NOT NULL", (rows[0]["seq"],)
                ).fetchone()[0]
                pick = match["id"] if overtaken < max_overtaken else pick
            row = con.execute(take.format(pick=":pick"), {**args, "pick": pick}).fetchone()
        return Job.from_row(row) if row is not None else None

    def _update_running(self, job_id: str, owner: str, sets: str, args: dict):
        now = time.time()
        row = (
            self._con()
            .execute(
                f"UPDATE jobs SET {sets}, updated_at = :now, lease_expires = :lease WHERE id = :id"
                " AND owner = :owner AND state = 'running' RETURNING cancel_requested",
                {**args, "now": now, "lease": now + self.lease_seconds, "id": job_id, "owner": owner},
            )
            .fetchone()
        )
        if row is None:
            raise NotOwner(f"job {job_id} is no longer owned by this worker")
        return row

    def start(self, job_id: str, owner: str, params: dict) -> None:
        """Record the parameters the worker resolved (the checkpoint's own defaults filled in)."""
        sets = "params = :params, steps = :steps, stage = 'text_encoding'"
        self._update_running(job_id, owner, sets, {"params": json.dumps(params), "steps": params["steps"]})

    def progress(
        self, job_id: str, owner: str, step: int, steps: int, expert: str, step_s: float, eta_s: float
    ) -> bool:
        """Record step ``step`` of ``steps`` (after the last one the VAE decode starts: stage
        ``decoding``); returns True when cancellation was requested."""
        sets = "step = :step, steps = :steps, expert = :expert, step_seconds = :step_s, eta_seconds = :eta_s,"
        sets += " stage = CASE WHEN :step >= :steps THEN 'decoding' ELSE 'denoising' END"
        args = {"step": step, "steps": steps, "expert": expert, "step_s": step_s, "eta_s": eta_s}
        return bool(self._update_running(job_id, owner, sets, args)["cancel_requested"])

    def stage(self, job_id: str, owner: str, stage: str) -> bool:
        """Record the stage of a running job; returns True when cancellation was requested."""
        return bool(
            self._update_running(job_id, owner, "stage = :stage", {"stage": stage})["cancel_requested"]
        )

    def finish(
        self,
        job_id: str,
        owner: str,
        state: str,
        error: str | None = None,
        timings: dict | None = None,
        peak_memory_bytes: int | None = None,
        result: tuple[Path, Path] | None = None,
    ) -> str:
        """End a running job; returns its final state. ``result`` = (temporary file, final path): the file
        is fsynced, then renamed and its directory fsynced inside the transaction that marks the job
        succeeded, so the video appears exactly when the job becomes succeeded, and survives a power cut
        once it has. On PostgreSQL the file is copied into the database instead, in that transaction
        (``wanfast.server.videos``; one above ``max_video_bytes`` fails the job). A cancellation requested
        before this commit wins: the job ends ``cancelled`` and the video is discarded. Raises NotOwner if
        fenced off."""
        if state not in TERMINAL:
            raise ValueError(f"not a final state: {state!r}")
        if result is not None and self.videos_in_db:
            size = result[0].stat().st_size
            if state == "succeeded" and size > self.max_video_bytes:
                state, error = "failed", videos.too_large(size, self.max_video_bytes)
        elif result is not None:
            _fsync(result[0])
        now, late = time.time(), "cancelled by request after the last step; the video was discarded"
        args = {"state": state, "late": late, "error": redact_paths(error), "now": now, "id": job_id,
                "timings": json.dumps(timings) if timings else None, "peak": peak_memory_bytes, "owner": owner}  # fmt: skip
        try:
            with self._tx() as con:
                row = con.execute(
                    "UPDATE jobs SET state = CASE WHEN cancel_requested = 1 AND :state = 'succeeded' THEN 'cancelled' ELSE :state END,"
                    " error = CASE WHEN cancel_requested = 1 AND :state = 'succeeded' THEN :late ELSE :error END,"
                    " timings = :timings, peak_memory_bytes = :peak, finished_at = :now, updated_at = :now,"
                    " eta_seconds = NULL, stage = NULL, lease_expires = NULL"
                    " WHERE id = :id AND owner = :owner AND state = 'running' RETURNING state",
                    args,
                ).fetchone()  # fmt: skip
                if row is None:
                    raise NotOwner(f"job {job_id} is no longer owned by this worker")
                if result is not None and row["state"] == "succeeded":
                    if self.videos_in_db:  # the rows commit with the job's new state, or neither does
                        videos.put(con, job_id, result[0])
                    else:
                        # should COMMIT fail now, the job stays running: the restart rule re-queues it, and
                        # its re-run overwrites this same file
                        result[0].replace(result[1])
                        _fsync(result[1].parent)
            return row["state"]
        finally:
            if result is not None:
                result[0].unlink(missing_ok=True)
