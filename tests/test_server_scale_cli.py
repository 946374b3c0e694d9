"""``wanfast serve --api-only`` and ``wanfast worker`` refuse what they cannot run, in one line each: no
shared store, the postgres extra missing, a server that cannot be reached (its password never shown)."""

from __future__ import annotations

import sys

import pytest

from wanfast.cli import main


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_roles_need_a_postgresql_store(capsys, tmp_path):
    code, out = run(capsys, "serve", "--model", "tiny", "--api-only", "--data-dir", str(tmp_path))
    assert code == 2 and "--api-only needs a shared job store: --store postgresql://" in out
    code, out = run(capsys, "worker", "--model", "tiny", "--data-dir", str(tmp_path))
    assert code == 2 and "wanfast worker needs a shared job store: --store postgresql://" in out
    code, out = run(capsys, "serve", "--model", "tiny", "--store", "x.db", "--data-dir", str(tmp_path))
    assert code == 2 and "--store takes a postgresql:// URL, not 'x.db': the SQLite store is DATA_DIR" in out


def test_a_missing_extra_and_an_unreachable_server_are_one_line(capsys, tmp_path, monkeypatch):
    import socket

    pytest.importorskip("psycopg", reason="the postgres extra")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://wanfast:s3cret@127.0.0.1:{port}/jobs"
    args = ("worker", "--model", "tiny", "--store", url, "--data-dir", str(tmp_path), "--db-timeout", "2")
    code, out = run(capsys, *args)
    assert (
        code == 2 and f"cannot connect to the job store postgresql://wanfast:***@127.0.0.1:{port}/jobs" in out
    )
    assert "s3cret" not in out and "Traceback" not in out
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    code, out = run(capsys, *args)
    assert code == 2 and "psycopg is not installed: pip install 'wanfast[postgres]'" in out
