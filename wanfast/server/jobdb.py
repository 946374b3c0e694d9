"""The job database's schema (created and migrated in place) and its row type."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, fields

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
    peak_memory_bytes INTEGER,
    stage TEXT,
    worker TEXT                             -- the name of the pool slot that ran it last
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS workers (
    name TEXT PRIMARY KEY,                  -- w0, w1, ...: one per slot of the pool
    owner TEXT UNIQUE,                      -- token of the process in the slot; NULL: nobody may claim
    pid INTEGER,
    state TEXT NOT NULL,                    -- starting, loading, ready, busy, failed, stopped
    detail TEXT,
    device TEXT,
    memory_allocated INTEGER,
    memory_reserved INTEGER,
    memory_total INTEGER,
    heartbeat_at REAL,
    restarts INTEGER NOT NULL DEFAULT 0
);
DROP TABLE IF EXISTS worker;                -- the one-worker table of earlier versions
"""
_ADDED_COLUMNS = {"stage": "TEXT", "worker": "TEXT"}  # columns later than the first schema


def migrate(con: sqlite3.Connection) -> None:
    """Create what is missing; add the columns an earlier version's database lacks. Safe to run from
    several processes at once."""
    con.executescript(_SCHEMA)  # idempotent; executescript manages its own transaction
    have = {row[1] for row in con.execute("PRAGMA table_info(jobs)")}
    for name, kind in _ADDED_COLUMNS.items():
        if name not in have:
            try:
                con.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as e:  # another process added it meanwhile
                if "duplicate column" not in str(e):
                    raise


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

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        values = {f.name: row[f.name] for f in fields(cls)}
        for name in ("request", "params", "timings"):
            values[name] = json.loads(values[name]) if values[name] is not None else None
        values["cancel_requested"] = bool(values["cancel_requested"])
        return cls(**values)
