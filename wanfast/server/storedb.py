"""The job store's database: SQLite (a file; one host, the default) or PostgreSQL (a server; many hosts).

``JobStore`` is written once, in SQL both speak; what differs is kept here:

- placeholders: the store writes ``?`` (positional) or ``:name`` (named), as sqlite3 takes them; for
  psycopg they become ``%s`` / ``%(name)s`` (``Dialect.sql``);
- column types (``Dialect.types``): SQLite's ``REAL`` is 8 bytes, PostgreSQL's 4 (``DOUBLE PRECISION``
  there); ``INTEGER`` is 8 bytes in SQLite, 4 in PostgreSQL (``BIGINT`` there); ``BLOB`` / ``BYTEA``;
- a transaction that reads then writes (the queue bound of ``submit``): SQLite's ``BEGIN IMMEDIATE`` takes
  the one write lock of the file; PostgreSQL takes a transaction-scoped advisory lock instead, the same
  one in every process, so such transactions run one at a time there too (``Database.begin``);
- claiming: ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, where claimers run concurrently and each skips the
  rows another one holds; nothing on SQLite, whose writes are serialised anyway (``Dialect.skip_locked``);
- rows are ``Row``: by index and by column name, as ``sqlite3.Row``.

psycopg (3) is imported only for a ``postgresql://`` store: it is the optional extra ``postgres``.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from wanfast.config import ConfigError

_ADVISORY_KEY = 0x77616E66  # "wanf": the lock every exclusive transaction of a PostgreSQL store takes


def _errors() -> tuple[type[Exception], ...]:
    try:
        import psycopg
    except ImportError:
        return (sqlite3.Error,)
    return (sqlite3.Error, psycopg.Error)


# what a store call raises when the database cannot answer (locked, full, unreachable): callers that must
# outlive it (the pool, a worker's heartbeat, the web process's 503) catch these
STORE_ERRORS: tuple[type[Exception], ...] = _errors()


def is_postgres(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class Row(tuple):
    """A result row: by index, by column name, and ``dict(row)`` (as ``sqlite3.Row``)."""

    _names: tuple[str, ...] = ()

    def __getitem__(self, key):
        if isinstance(key, str):
            return tuple.__getitem__(self, self._names.index(key))
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._names)


def _row_factory(cursor):
    names = tuple(c.name for c in cursor.description or ())
    kind = type("Row", (Row,), {"_names": names})
    return lambda values: kind(values)


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@dataclass(frozen=True)
class Dialect:
    name: str  # "sqlite" or "postgres"
    types: dict[str, str] = field(default_factory=dict)  # schema placeholders, e.g. {real} -> its type
    skip_locked: str = ""  # appended to the claim's row selection

    def sql(self, text: str) -> str:
        """The statement in this driver's placeholders."""
        if self.name == "sqlite":
            return text
        text = text.replace("%", "%%").replace("?", "%s")
        return _NAMED.sub(r"%(\1)s", text)

    def schema(self, text: str) -> str:
        return text.format(**self.types)


SQLITE = Dialect(
    "sqlite", {"pk": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL", "int": "INTEGER", "blob": "BLOB"}
)
POSTGRES = Dialect(
    "postgres",
    {"pk": "BIGSERIAL PRIMARY KEY", "real": "DOUBLE PRECISION", "int": "BIGINT", "blob": "BYTEA"},
    skip_locked=" FOR UPDATE SKIP LOCKED",
)


class Connection:
    """One driver connection in autocommit mode (a statement is its own transaction unless ``begin``
    opened one), speaking the store's placeholders."""

    def __init__(self, raw, dialect: Dialect) -> None:
        self.raw, self.dialect = raw, dialect

    def execute(self, sql: str, args: tuple | dict = ()):
        return self.raw.execute(self.dialect.sql(sql), args)

    def executemany(self, sql: str, seq) -> None:
        if self.dialect.name == "sqlite":
            self.raw.executemany(sql, seq)
        else:
            with self.raw.cursor() as cur:
                cur.executemany(self.dialect.sql(sql), list(seq))

    @property
    def broken(self) -> bool:
        return self.dialect.name == "postgres" and self.raw.closed


class Database:
    """Where the jobs live: ``target`` a file path (SQLite) or a ``postgresql://user@host:port/db`` URL.
    One connection per thread. ``timeout``: seconds a statement waits for a lock before it fails."""

    def __init__(self, target: str | Path, timeout: float) -> None:
        self.postgres = is_postgres(target)
        self.target = str(target) if self.postgres else Path(target)
        self.dialect, self.timeout = (POSTGRES if self.postgres else SQLITE), timeout
        self._local = threading.local()
        if self.postgres:
            try:
                import psycopg  # noqa: F401
            except ImportError as e:
                raise ModuleNotFoundError(
                    "a postgresql:// job store needs psycopg: pip install 'wanfast[postgres]'", name="psycopg"
                ) from e

    def __str__(self) -> str:
        return redact_url(self.target) if self.postgres else str(self.target)

    def con(self) -> Connection:
        con = getattr(self._local, "con", None)
        if con is None or con.broken:  # a PostgreSQL connection lost (server restart): a new one
            con = self._local.con = Connection(self._connect(), self.dialect)
        return con

    def _connect(self):
        if not self.postgres:
            con = sqlite3.connect(self.target, timeout=self.timeout, isolation_level=None)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")  # an accepted job survives a power cut, not just a kill
            return con
        import psycopg

        ms = int(self.timeout * 1000)
        try:
            return psycopg.connect(
                self.target, autocommit=True, row_factory=_row_factory, connect_timeout=max(2, int(self.timeout)),
                options=f"-c lock_timeout={ms} -c idle_in_transaction_session_timeout={max(ms, 60000)}",
                application_name="wanfast",
            )  # fmt: skip
        except psycopg.Error as e:
            why = " ".join(str(e).split())  # libpq's message spans lines
            raise psycopg.OperationalError(f"cannot connect to the job store {self}: {why}") from None

    @contextmanager
    def begin(self, exclusive: bool = False) -> Iterator[Connection]:
        """A transaction. ``exclusive``: one at a time across every process of the store (SQLite's write
        lock; a PostgreSQL advisory lock), for a read-then-write whose rows no lock covers."""
        con = self.con()
        if self.postgres:
            con.execute("BEGIN")
            if exclusive:
                con.execute("SELECT pg_advisory_xact_lock(?)", (_ADVISORY_KEY,))
        else:
            con.execute("BEGIN IMMEDIATE")  # take the write lock now: read-then-write without races
        try:
            yield con
        except BaseException:
            try:
                con.execute("ROLLBACK")
            except STORE_ERRORS:
                pass  # a lost connection rolls back by itself; the original error says why
            raise
        con.execute("COMMIT")

    def check(self) -> None:
        """Raise ``ConfigError`` for a database that cannot be used: a PostgreSQL server that cannot be
        reached (named, without its password)."""
        if not self.postgres:
            return
        try:
            self.con().execute("SELECT 1").fetchone()
        except STORE_ERRORS as e:
            raise ConfigError(f"{e}".strip()) from None
