"""The job database's schema, versioned, created and migrated in place by the service; and its row type.

``schema_version`` holds one row: the version of the schema the database has. Every process that opens
the store runs ``migrate``: in one exclusive transaction (so several processes starting at once migrate
once) it applies the steps the database lacks, then records the new version. A database of a version newer
than this code is refused (an older wanfast must not write a schema it does not know). A database of the
versions before the version table (1 and 2, SQLite only) is recognised by its tables: each step is written
to be idempotent (``IF NOT EXISTS``, a column added only when missing), so such a database simply runs
every step.

Versions: 1, the jobs and their workers; 2, a running job's ``stage`` and the ``worker`` that ran it;
3, the lease of a claimed job (``lease_expires``), and the videos and input images stored in the database
(PostgreSQL stores, ``wanfast.server.videos``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from wanfast.config import ConfigError
from wanfast.server.storedb import Connection, Database

# {pk}, {real}, {int}, {blob}: the dialect's types (storedb.Dialect.types)
_V1 = [
    """CREATE TABLE IF NOT EXISTS jobs (
    seq {pk},                               -- queue order; a re-queued job keeps its place
    id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    request TEXT NOT NULL,                  -- JSON, as validated by the web process
    params TEXT,                            -- JSON, the SamplingParams the worker resolved and ran
    idempotency_key TEXT UNIQUE,
    created_at {real} NOT NULL,
    started_at {real},
    finished_at {real},
    updated_at {real} NOT NULL,
    step {int} NOT NULL DEFAULT 0,
    steps {int},
    expert TEXT,
    step_seconds {real},
    eta_seconds {real},
    attempts {int} NOT NULL DEFAULT 0,
    owner TEXT,
    cancel_requested {int} NOT NULL DEFAULT 0,
    error TEXT,
    note TEXT,
    timings TEXT,
    peak_memory_bytes {int}
)""",
    "CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq)",
    """CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY,                  -- w0, w1, ... (host-pid-w0 on PostgreSQL): one per pool slot
    owner TEXT UNIQUE,                      -- token of the process in the slot; NULL: nobody may claim
    pid {int},
    state TEXT NOT NULL,                    -- starting, loading, ready, busy, failed, stopped
    detail TEXT,
    device TEXT,
    memory_allocated {int},
    memory_reserved {int},
    memory_total {int},
    heartbeat_at {real},
    restarts {int} NOT NULL DEFAULT 0
)""",
    "DROP TABLE IF EXISTS worker",  # the one-worker table of earlier versions
]
_V2_COLUMNS = {"stage": "TEXT", "worker": "TEXT"}  # worker: the name of the pool slot that ran it last
_V3 = [
    # a claimed job is its worker's until then; the worker's heartbeat renews it (jobs.JobStore.heartbeat)
    ("column", "lease_expires", "{real}"),
    """CREATE TABLE IF NOT EXISTS videos (
    job_id TEXT PRIMARY KEY,
    size {int} NOT NULL,
    chunks {int} NOT NULL
)""",
    """CREATE TABLE IF NOT EXISTS video_chunks (
    job_id TEXT NOT NULL,
    n {int} NOT NULL,                       -- 0, 1, ...: the video is their data in this order
    data {blob} NOT NULL,
    PRIMARY KEY (job_id, n)
)""",
    """CREATE TABLE IF NOT EXISTS inputs (
    digest TEXT PRIMARY KEY,                -- sha256 of the image file a job's request names
    data {blob} NOT NULL
)""",
]
STEPS: list[list] = [_V1, [("column", name, kind) for name, kind in _V2_COLUMNS.items()], _V3]
SCHEMA_VERSION = len(STEPS)


def _columns(con: Connection, table: str) -> set[str]:
    if con.dialect.name == "sqlite":
        return {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
    sql = "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = ?"
    return {row[0] for row in con.execute(sql, (table,))}


def _apply(con: Connection, step: list) -> None:
    for item in step:
        if isinstance(item, tuple):  # ("column", name, type) of jobs, added when missing
            _, name, kind = item
            if name not in _columns(con, "jobs"):
                con.execute(f"ALTER TABLE jobs ADD COLUMN {name} {con.dialect.schema(kind)}")
        else:
            con.execute(con.dialect.schema(item))


def migrate(db: Database, upto: int = SCHEMA_VERSION) -> int:
    """Create the schema or bring it to version ``upto`` (tests stop earlier, to make an old database);
    returns the version the database had. Safe to run from several processes at once."""
    with db.begin(exclusive=True) as con:
        con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = con.execute("SELECT MAX(version) FROM schema_version").fetchone()
        have = row[0] or 0  # 0: new, or of the versions before this table (their steps are idempotent)
        if have > SCHEMA_VERSION:
            raise ConfigError(
                f"the job database {db} has schema version {have}, newer than this wanfast's "
                f"({SCHEMA_VERSION}): upgrade wanfast on this host"
            )
        for step in STEPS[have:upto]:
            _apply(con, step)
        if upto > have:
            con.execute("DELETE FROM schema_version")
            con.execute("INSERT INTO schema_version (version) VALUES (?)", (upto,))
    return have


def schema_version(db: Database) -> int:
    return db.con().execute("SELECT MAX(version) FROM schema_version").fetchone()[0]


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
    stage: str | None
    worker: str | None
    lease_expires: float | None = None  # a running job's: its worker renews it with every heartbeat

    @classmethod
    def from_row(cls, row) -> Job:
        values = {f.name: row[f.name] for f in fields(cls)}
        for name in ("request", "params", "timings"):
            values[name] = json.loads(values[name]) if values[name] is not None else None
        values["cancel_requested"] = bool(values["cancel_requested"])
        return cls(**values)
