"""What the door refuses and what the store guarantees, without processes: strict request types, cost
limits, host names, what responses may show, the start-up checks of the job database, the fsync before
success, a cancellation after the last step, the pool's slot plan. In-process app (TestClient), no worker;
one ``serve`` start that refuses a corrupt database."""

from __future__ import annotations

import os
import re
import sqlite3

import pytest
from fastapi.testclient import TestClient

from wanfast.config import ConfigError
from wanfast.server.app import ServerSettings, create_app
from wanfast.server.jobdb import SCHEMA_VERSION, migrate, schema_version
from wanfast.server.jobs import JobStore, open_store
from wanfast.server.pool import Slot, parse_gpus, plan_slots, slot_split
from wanfast.server.safety import default_allowed_hosts, host_allowed, redact_paths, utf8_safe
from wanfast.server.schemas import Limits, VideoJob
from wanfast.server.storedb import Database
from wanfast.specs import SPECS, resolve_params

TINY = SPECS["tiny"].defaults


@pytest.fixture
def app_client(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    store.reset_workers(["w0"])
    settings = ServerSettings(
        results_dir=tmp_path, spec=SPECS["tiny"], allowed_hosts=default_allowed_hosts("127.0.0.1")
    )
    with TestClient(create_app(store, settings), base_url="http://127.0.0.1:8000") as client:
        yield client, store


def test_limits_default_to_two_and_a_half_times_the_default_request():
    a14b = Limits.default(SPECS["t2v-A14B"].defaults)
    assert (a14b.max_pixel_frames, a14b.max_steps) == (186_624_000, 100)  # 2.5 x 1280x720x81, 2.5 x 40
    fits = SPECS["t2v-A14B"]

    a14b.check(resolve_params(fits, "x", width=1920, height=1088))  # 1080p, 81 frames
    with pytest.raises(ValueError, match=r"4096x4096 x 1001 frames is 16,793,993,216 pixel-frames; this server "
                       r"accepts at most 186,624,000 per request \(--max-pixel-frames\)"):  # fmt: skip
        a14b.check(resolve_params(fits, "x", width=4096, height=4096, frames=1001))
    with pytest.raises(ValueError, match=r"steps 1000: this server accepts at most 100 \(--max-steps\)"):
        a14b.check(resolve_params(fits, "x", steps=1000))


def test_every_response_has_the_security_headers_and_docs_load_nothing_from_outside(app_client):
    client, _ = app_client
    for path in ("/", "/docs", "/v1/videos", "/health", "/v1/videos/nope"):
        r = client.get(path)
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff", (
            path
        )
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "https:" not in csp, path
    for page in ("/", "/docs"):
        html = client.get(page).text
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "<script src" not in html, (
            page
        )


def test_host_allow_list(app_client):
    client, _ = app_client
    for host in ("evil.example.com", "evil.example.com:8000", "127.0.0.1.evil.example.com", ""):
        r = client.get("/v1/videos", headers={"Host": host})
        assert r.status_code == 400 and "does not answer to Host" in r.json()["detail"], host
    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000"):
        assert client.get("/v1/videos", headers={"Host": host}).status_code == 200, host
    assert host_allowed("a.corp", ["*.corp"]) and not host_allowed("corp", ["*.corp"])
    assert host_allowed("anything", None) and default_allowed_hosts("0.0.0.0") is None


def test_poisoned_rows_of_an_earlier_version_still_list(app_client):
    """A job stored with a lone surrogate (before the door refused them) must not break the list."""
    client, store = app_client
    store.submit({"prompt": "ok", "negative_prompt": "\udfff"}, 10)
    r = client.get("/v1/videos")
    assert r.status_code == 200 and r.json()["data"][0]["request"]["negative_prompt"] == "\\udfff"
    assert utf8_safe({"a": ["\ud800x"]}) == {"a": ["\\ud800x"]} and utf8_safe("ok") == "ok"


def test_error_messages_do_not_show_server_paths(tmp_path):
    msg = "FileNotFoundError: [Errno 2] No such file: '/srv/models/Wan2.2/high_noise_model/x.safetensors'"
    assert redact_paths(msg) == "FileNotFoundError: [Errno 2] No such file: '…/x.safetensors'"
    assert redact_paths("size 64/48 and 1/2") == "size 64/48 and 1/2"  # not a path: nothing to cut
    store = JobStore(tmp_path / "jobs.db")
    store.reset_workers(["w0"])
    store.submit({"prompt": "x"}, 4)
    store.register_worker("w0", "t")
    job = store.claim("t")
    store.finish(job.id, "t", "failed", error=f"OSError: cannot read {tmp_path}/secret/file.bin")
    assert store.get(job.id).error == "OSError: cannot read …/file.bin"
    store.heartbeat("t", "failed", detail=f"model load failed: {tmp_path}/ckpt/vae.pth")
    assert store.workers()[0]["detail"] == "model load failed: …/vae.pth"
    job.error = "/home/user/x.py failed"  # a row of an earlier version: cut when shown
    assert VideoJob.of(job).error == "…/x.py failed"


def test_corrupt_damaged_and_lost_databases_are_clear_errors(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    db = tmp_path / "jobs.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ConfigError, match=rf"{db} is not a readable job database \(file is not a database\): "
                       "restore it from a backup, or move it aside"):  # fmt: skip
        open_store(db, results)
    db.write_bytes(b"")
    assert open_store(db, results).counts()["queued"] == 0  # empty and no videos: a fresh start
    (results / "0b5c.mp4").write_bytes(b"video")
    for content in (b"", None):  # empty, or missing, while videos of its jobs remain
        if content is None:
            db.unlink()
            for extra in ("-wal", "-shm"):
                (tmp_path / f"jobs.db{extra}").unlink(missing_ok=True)
        else:
            db.write_bytes(content)
        with pytest.raises(ConfigError, match=rf"{db} is (empty|missing) but {results} holds 1 video\(s\) of "
                           "earlier jobs: the job database was lost"):  # fmt: skip
            open_store(db, results)


def test_a_database_of_the_previous_version_is_migrated(tmp_path):
    # a database of version 1, as written before the version table existed: no schema_version, the
    # one-worker table of that time beside it
    migrate(Database(tmp_path / "jobs.db", 5.0), upto=1)
    con = sqlite3.connect(tmp_path / "jobs.db")
    con.executescript("DROP TABLE schema_version; CREATE TABLE worker (id INTEGER PRIMARY KEY);")
    assert "stage" not in {r[1] for r in con.execute("PRAGMA table_info(jobs)")}
    con.execute(
        "INSERT INTO jobs (id, state, request, created_at, updated_at) VALUES ('j', 'queued', '{}', 0, 0)"
    )
    con.commit()
    con.close()
    store = JobStore(tmp_path / "jobs.db")
    job = store.get("j")
    assert job.stage is None and job.worker is None and job.state == "queued"
    tables = {r[0] for r in store._con().execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "worker" not in tables and "workers" in tables
    assert schema_version(store.db) == SCHEMA_VERSION and job.lease_expires is None


def test_the_video_is_fsynced_before_the_job_is_marked_succeeded(tmp_path, monkeypatch):
    store = JobStore(tmp_path / "jobs.db")
    store.reset_workers(["w0"])
    store.submit({"prompt": "x"}, 4)
    store.register_worker("w0", "t")
    job = store.claim("t")
    tmp, final = tmp_path / f"{job.id}.tmp.mp4", tmp_path / f"{job.id}.mp4"
    tmp.write_bytes(b"video")
    observer, synced, real_fsync = JobStore(tmp_path / "jobs.db"), [], os.fsync

    def fsync(fd: int) -> None:
        # what another process sees while this file or directory is flushed: the job not yet succeeded
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), observer.get(job.id).state))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.finish(job.id, "t", "succeeded", result=(tmp, final))
    assert synced == [(str(tmp), "running"), (str(tmp_path), "running")], synced
    assert store.get(job.id).state == "succeeded" and final.read_bytes() == b"video"


def test_a_cancel_after_the_last_step_discards_the_video(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    store.reset_workers(["w0"])
    store.submit({"prompt": "x"}, 4)
    store.register_worker("w0", "t")
    job = store.claim("t")
    store.progress(job.id, "t", 4, 4, "low_noise", 0.1, 0.0)  # the last step: decoding now
    assert store.cancel(job.id).cancel_requested
    tmp, final = tmp_path / f"{job.id}.tmp.mp4", tmp_path / f"{job.id}.mp4"
    tmp.write_bytes(b"video")
    assert store.finish(job.id, "t", "succeeded", result=(tmp, final)) == "cancelled"
    got = store.get(job.id)
    assert got.state == "cancelled" and "after the last step; the video was discarded" in got.error
    assert not final.exists() and not tmp.exists()


def test_slot_plans():
    assert parse_gpus("0,1, 3") == [0, 1, 3]
    for bad in ("0,0", "a", "-1", ""):
        with pytest.raises(ConfigError, match="--gpus takes"):
            parse_gpus(bad)
    assert plan_slots([0, 1, 2, 3], 2) == [Slot("w0", (0, 1), 2), Slot("w1", (2, 3), 2)]
    assert plan_slots(None, 1, 3) == [Slot("w0"), Slot("w1"), Slot("w2")] and plan_slots(None) == [Slot("w0")]
    with pytest.raises(ConfigError, match="not a multiple of --gpus-per-worker 2"):
        plan_slots([0, 1, 2], 2)
    with pytest.raises(ConfigError, match="--workers 3 does not match --gpus"):
        plan_slots([0, 1], 1, 3)
    assert slot_split(1) == {} and slot_split(2) == {"cfg_parallel": True, "ulysses": 1}
    assert slot_split(8) == {"cfg_parallel": True, "ulysses": 4} and slot_split(3) == {
        "cfg_parallel": False,
        "ulysses": 3,
    }


def test_serve_refuses_a_corrupt_database_with_the_way_out(tmp_path):
    """The whole command, as a user meets it: one line naming the file and what to do, exit code 2."""
    from wanfast.server.testing import ServerProcess

    (tmp_path / "jobs.db").write_bytes(b"\x00garbage" * 512)
    code, output = ServerProcess(tmp_path).run_to_exit()
    assert code == 2 and "Traceback" not in output, output
    assert f"wanfast: error: {tmp_path / 'jobs.db'} is not a readable job database" in output
    assert "move it aside (with any jobs.db-wal and jobs.db-shm beside it)" in output
