"""Worker processes launched before the server's checks (``pool.Held``, on by default, ``--no-prelaunch``
off): they import while the server checks its flags, touch nothing until the pool assigns them, and a
server that refuses to start leaves none behind. The pool adopting them is what every server test runs;
``test_server_restart`` starts its first server with ``--no-prelaunch``, the plain path."""

from __future__ import annotations

import json

import pytest

from wanfast.cli import build_parser
from wanfast.config import ConfigError
from wanfast.server import cli as server_cli
from wanfast.server import pool as pool_mod
from wanfast.server.pool import Slot, launch


def test_a_prelaunched_worker_ends_at_eof_having_touched_nothing(tmp_path):
    (proc,) = launch(Slot("w0"), tmp_path)
    cmd = proc.proc.args
    assert json.loads(cmd[-2]) == {"data_dir": str(tmp_path)} and json.loads(cmd[-1]) == {
        "name": "w0",
        "rank": 0,
    }
    proc.proc.stdin.close()  # the server gave up before assigning it
    assert proc.proc.wait(timeout=120) == 0
    assert proc.beats == 0, "no heartbeat before an assignment"
    assert list(tmp_path.iterdir()) == [], "no store, scratch folder or file before an assignment"


@pytest.mark.parametrize("extra", [(), ("--no-prelaunch",)])
def test_a_refused_serve_kills_its_prelaunched_workers(tmp_path, monkeypatch, extra):
    made = []
    real = pool_mod.Held.__init__

    def record(self, slots, data_dir):
        real(self, slots, data_dir)
        made.append([p for _, ps in self._procs for p in ps])

    monkeypatch.setattr(pool_mod.Held, "__init__", record)
    argv = ["serve", "--model", "tiny", "--device", "cpu", "--workers", "2", "--data-dir", str(tmp_path),
            "--queue-size", "0", *extra]  # fmt: skip
    args = build_parser().parse_args(argv)
    with pytest.raises(ConfigError, match="--queue-size"):
        server_cli.serve_main(args)
    if extra:
        assert made == [], "--no-prelaunch starts no process before the checks"
        return
    (procs,) = made
    assert len(procs) == 2, "one process per slot, launched before the checks"
    assert all(p.proc.poll() is not None for p in procs), "a refused server leaves no worker behind"
    assert not (tmp_path / "jobs.db").exists() and not (tmp_path / "workers").exists()


def test_held_processes_go_to_the_slot_they_were_launched_for(tmp_path):
    held, w1 = pool_mod.Held([Slot("w0"), Slot("w1")], tmp_path), None
    try:
        assert held.take(Slot("w9")) is None, "a slot launched for nobody gets a fresh launch"
        w1 = held.take(Slot("w1"))
        assert w1 is not None and json.loads(w1[0].proc.args[-1])["name"] == "w1"
        assert held.take(Slot("w1")) is None, "taken once"
    finally:
        held.close()
        for p in w1 or []:
            p.kill()
    assert held.take(Slot("w0")) is None, "closed: none left to take"
