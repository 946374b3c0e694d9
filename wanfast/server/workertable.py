"""The ``workers`` table of the job store (``server.jobs``): the pool's slots, their owner tokens (fencing),
heartbeats and what /health shows. A mixin of ``JobStore``: it uses the store's connection helpers."""

from __future__ import annotations

import time

from wanfast.server.safety import redact_paths

FORGET_SECONDS = 600.0  # a PostgreSQL store forgets a worker row silent this long (its host is gone)


class WorkerTable:
    """Worker registration and heartbeats (``JobStore`` provides ``db``, ``_con``, ``_tx`` and
    ``lease_seconds``)."""

    def reset_workers(self, names: list[str]) -> None:
        """The pool's slots, all stopped (at server start, before any worker runs). SQLite: the only pool
        of the store, it replaces every row. PostgreSQL: one pool of many, it replaces its own rows and
        drops those of workers silent for ``FORGET_SECONDS`` (a host gone for good)."""
        with self._tx() as con:
            if self.db.postgres:
                con.executemany("DELETE FROM workers WHERE name = ?", [(n,) for n in names])
                con.execute("DELETE FROM workers WHERE heartbeat_at < ?", (time.time() - FORGET_SECONDS,))
            else:
                con.execute("DELETE FROM workers")
            con.executemany("INSERT INTO workers (name, state) VALUES (?, 'stopped')", [(n,) for n in names])

    def register_worker(self, name: str, owner: str | None) -> None:
        """Make ``owner`` the only token of slot ``name`` that may claim jobs (None: fence it off; a failed
        worker keeps its state and detail for /health)."""
        if owner is not None:
            sql = "UPDATE workers SET owner = :owner, pid = NULL, heartbeat_at = :now, state = 'starting', detail = NULL"
        else:
            sql = (
                "UPDATE workers SET owner = NULL, pid = NULL, heartbeat_at = :now,"
                " state = CASE WHEN state = 'failed' THEN 'failed' ELSE 'stopped' END,"
                " detail = CASE WHEN state = 'failed' THEN detail END"
            )
        self._con().execute(sql + " WHERE name = :name", {"owner": owner, "now": time.time(), "name": name})

    def count_worker_restart(self, name: str) -> None:
        self._con().execute("UPDATE workers SET restarts = restarts + 1 WHERE name = ?", (name,))

    def heartbeat(self, owner: str, state: str, **info: object) -> bool:
        """Record a worker's state (and pid, device, memory_*) and renew the lease of its job; False once
        the worker is fenced off."""
        allowed = {"pid", "detail", "device", "memory_allocated", "memory_reserved", "memory_total"}
        info = {k: redact_paths(v) if k == "detail" else v for k, v in info.items() if k in allowed}
        cols = "".join(f", {k} = :{k}" for k in info)
        now, con = time.time(), self._con()
        cur = con.execute(
            f"UPDATE workers SET state = :state, heartbeat_at = :now{cols} WHERE owner = :owner",
            {**info, "state": state, "now": now, "owner": owner},
        )
        if cur.rowcount != 1:
            return False
        con.execute(
            "UPDATE jobs SET lease_expires = ? WHERE owner = ? AND state = 'running'",
            (now + self.lease_seconds, owner),  # once the rule has taken the job, its owner is no longer this
        )
        return True

    def workers(self) -> list[dict]:
        return [dict(r) for r in self._con().execute("SELECT * FROM workers ORDER BY name").fetchall()]
