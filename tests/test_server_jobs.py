"""The job store's state machine, queue bound, restart rule and fencing; request validation. No processes.
Every store test runs on SQLite and on a real PostgreSQL server (a throwaway cluster: conftest.postgres)."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from wanfast.config import ConfigError
from wanfast.server import videos
from wanfast.server.jobdb import SCHEMA_VERSION, migrate, schema_version
from wanfast.server.jobs import IdempotencyConflict, JobStore, NotOwner, QueueFull
from wanfast.server.schemas import VideoRequest, validate_request
from wanfast.server.storedb import Database
from wanfast.specs import SPECS

REQ = {"prompt": "a cat", "steps": 4}


@pytest.fixture(params=["sqlite", "postgres"])
def new_target(request, tmp_path):
    """A function making a new empty database: a SQLite file, or a database of the PostgreSQL cluster."""
    if request.param == "sqlite":
        return lambda: tmp_path / f"{uuid.uuid4().hex[:8]}.db"
    return request.getfixturevalue("postgres").new_database


@pytest.fixture
def store(new_target):
    store = JobStore(new_target())
    store.reset_workers(["w0", "w1"])
    return store


def video(store: JobStore, job_id: str, final) -> bytes | None:
    """The stored video of a job: its file on SQLite, its rows on PostgreSQL (None: there is none)."""
    if store.videos_in_db:
        assert not final.exists(), "a PostgreSQL store keeps no video file"
        return b"".join(videos.chunks(store, job_id)) if videos.size(store, job_id) is not None else None
    return final.read_bytes() if final.exists() else None


def claimed(store: JobStore, owner: str = "w1", slot: str = "w0"):
    store.register_worker(slot, owner)
    job = store.claim(owner)
    assert job is not None and job.state == "running" and job.owner == owner
    return job


def test_lifecycle_and_atomic_result(store, tmp_path):
    job, created = store.submit(REQ, max_queued=4, steps=4)
    assert created and job.state == "queued" and job.request == REQ and job.steps == 4
    assert store.queue_position(job) == 0
    assert store.claim("nobody") is None, "an unregistered worker must not take jobs"
    job = claimed(store)
    assert job.attempts == 1 and store.queue_position(job) is None and job.worker == "w0"
    assert job.stage == "starting"
    store.start(job.id, "w1", {"steps": 4, "prompt": "a cat"})
    assert store.get(job.id).stage == "text_encoding"
    assert store.progress(job.id, "w1", 1, 4, "high_noise", 0.5, 1.5) is False
    got = store.get(job.id)
    assert (got.step, got.steps, got.expert, got.eta_seconds, got.stage) == (
        1,
        4,
        "high_noise",
        1.5,
        "denoising",
    )
    store.progress(job.id, "w1", 4, 4, "low_noise", 0.5, 0.0)
    assert store.get(job.id).stage == "decoding"  # after the last step: the VAE decode
    assert store.stage(job.id, "w1", "writing") is False and store.get(job.id).stage == "writing"
    tmp, final = tmp_path / f"{job.id}.tmp.mp4", tmp_path / f"{job.id}.mp4"
    tmp.write_bytes(b"video")
    assert store.finish(job.id, "w1", "succeeded", timings={"total": 2.0}, result=(tmp, final)) == "succeeded"
    got = store.get(job.id)
    assert got.state == "succeeded" and got.timings == {"total": 2.0} and got.finished_at is not None
    assert got.stage is None
    assert video(store, job.id, final) == b"video" and not tmp.exists()
    assert store.counts() == {"queued": 0, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0}
    with pytest.raises(ValueError, match="not a final state"):
        store.finish(job.id, "w1", "running")


def test_queue_bound_counts_waiting_jobs_only(store):
    store.submit(REQ, max_queued=2)
    store.submit(REQ, max_queued=2)
    with pytest.raises(QueueFull, match="2 jobs waiting"):
        store.submit(REQ, max_queued=2)
    claimed(store)  # a running job frees a queue slot
    job, created = store.submit(REQ, max_queued=2)
    assert created and store.queue_position(job) == 1
    assert store.list(state="queued")[1] == 2 and store.list()[1] == 3


def test_idempotency_key_returns_the_first_job_for_the_same_request_only(store):
    first, created = store.submit(REQ, max_queued=4, idempotency_key="k1")
    again, created_again = store.submit(dict(REQ), max_queued=4, idempotency_key="k1")
    assert created and not created_again and again.id == first.id and again.request == REQ
    with pytest.raises(
        IdempotencyConflict, match=f"'k1' was used for a different request \\(job {first.id}\\)"
    ):
        store.submit({"prompt": "other"}, max_queued=4, idempotency_key="k1")
    assert store.list()[1] == 1


def test_cancel_queued_now_running_at_next_step(store):
    store.submit(REQ, 4)
    running = claimed(store)
    queued, _ = store.submit(REQ, 4)
    assert store.cancel(queued.id).state == "cancelled"
    flagged = store.cancel(running.id)
    assert flagged.state == "running" and flagged.cancel_requested
    assert store.progress(running.id, "w1", 2, 4, "low_noise", 0.1, 0.2) is True
    store.finish(running.id, "w1", "cancelled", error="stopped")
    assert store.cancel(running.id).state == "cancelled"  # terminal: unchanged
    assert store.cancel("no-such-id") is None


def test_restart_rule(store, tmp_path):
    store.max_attempts = 3
    ids = [store.submit({"prompt": f"job {i}"}, 10)[0].id for i in range(5)]
    store.register_worker("w0", "t0")
    plain, to_cancel, poison = (store.claim("t0") for _ in range(3))
    store.register_worker("w1", "t1")
    other = store.claim("t1")  # another worker's job, alive: the rule leaves it alone
    store.progress(plain.id, "t0", 3, 4, "low_noise", 0.1, 0.1)
    store.cancel(to_cancel.id)
    store._con().execute("UPDATE jobs SET attempts = 3 WHERE id = ?", (poison.id,))
    (tmp_path / f"{plain.id}.tmp.mp4").write_bytes(b"half a video")
    (tmp_path / f"{other.id}.tmp.mp4").write_bytes(b"being written")

    assert store.recover(tmp_path, "worker w0 exited", owner="t0") == {}, "t0 is registered: not gone"
    store.register_worker("w0", None)  # fenced, as the pool does before the rule
    changed = store.recover(tmp_path, "server restarted")
    assert changed == {plain.id: "queued", to_cancel.id: "cancelled", poison.id: "failed"}
    requeued = store.get(plain.id)
    assert requeued.note == "re-queued: server restarted at step 3 of 4" and requeued.step == 0
    assert requeued.owner is None and requeued.error is None and requeued.attempts == 1
    assert "interrupted 3 times (server restarted" in store.get(poison.id).error
    assert "cancelled by request" in store.get(to_cancel.id).error
    assert store.get(ids[4]).state == "queued" and store.get(other.id).state == "running"
    assert [p.name for p in tmp_path.glob("*.tmp.mp4")] == [f"{other.id}.tmp.mp4"]
    # the interrupted job keeps its place ahead of the job submitted after it
    store.register_worker("w0", "t2")
    assert store.claim("t2").id == plain.id and store.claim("t2").id == ids[4]


def test_clean_shutdown_does_not_count_an_attempt(store):
    store.max_attempts = 1
    store.submit(REQ, 4)
    job = claimed(store)
    store.register_worker("w0", None)
    assert store.recover(None, "server stopped", count_attempt=False) == {job.id: "queued"}
    assert store.get(job.id).attempts == 0
    claimed(store, "w2")
    store.register_worker("w0", None)
    assert store.recover(None, "server restarted") == {job.id: "failed"}


def test_fencing_keeps_an_orphaned_worker_out(store, tmp_path):
    store.submit(REQ, 4)
    store.submit(REQ, 4)
    job = claimed(store, "old")
    store.register_worker("w0", "new")
    assert store.claim("old") is None, "a replaced worker must not take jobs"
    assert not store.heartbeat("old", "busy") and store.heartbeat("new", "ready", pid=1)
    store.recover(tmp_path, "server restarted")
    with pytest.raises(NotOwner):
        store.progress(job.id, "old", 2, 4, "high_noise", 0.1, 0.1)
    tmp, final = tmp_path / "x.tmp.mp4", tmp_path / "x.mp4"
    tmp.write_bytes(b"late")
    with pytest.raises(NotOwner):
        store.finish(job.id, "old", "succeeded", result=(tmp, final))
    assert video(store, job.id, final) is None and not tmp.exists() and store.get(job.id).state == "queued"


def test_validate_request_shares_the_pipeline_rules():
    spec, limit = SPECS["tiny"], 50
    defaults = spec.defaults
    ok, params, _ = validate_request(VideoRequest(prompt="a cat", size="64x32", frames=5, fps=8), spec, limit)
    assert ok == {"prompt": "a cat", "size": [64, 32], "frames": 5, "seed": 0, "fps": 8}
    assert (params.width, params.height, params.frames, params.steps) == (64, 32, 5, defaults.steps)
    stored, params, _ = validate_request(VideoRequest(prompt="a", negative_prompt=""), spec, limit)
    assert stored["negative_prompt"] == "" and params.negative_prompt == defaults.negative_prompt
    bad = [
        ({"size": "100x100"}, "width must be a positive multiple of 16"),
        ({"frames": 10}, "frames must be 4n\\+1"),
        ({"size": "8192x16"}, "at most 4096 pixels per side"),
        ({"prompt": "x" * 51}, "prompt has 51 characters; this server accepts at most 50"),
        ({"negative_prompt": "x" * 60}, "negative_prompt has 60 characters"),
    ]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            validate_request(VideoRequest(**{"prompt": "a cat", **fields}), spec, limit)


def test_a_store_of_the_previous_schema_version_is_migrated(new_target):
    """A database of version N-1 (made by the migration steps stopped there), with a job in it: opening the
    store brings it to version N, the job intact; a database newer than this code is refused."""
    target = new_target()
    old = Database(target, 5.0)
    assert migrate(old, upto=SCHEMA_VERSION - 1) == 0 and schema_version(old) == SCHEMA_VERSION - 1
    columns = "id, state, request, created_at, updated_at, stage"
    old.con().execute(f"INSERT INTO jobs ({columns}) VALUES ('j', 'queued', '{{}}', 1, 1, NULL)")
    with pytest.raises(Exception, match="lease_expires"):  # the column version N adds is not there yet
        old.con().execute("SELECT lease_expires FROM jobs").fetchall()
    migrated = JobStore(target)
    assert schema_version(migrated.db) == SCHEMA_VERSION
    job = migrated.get("j")
    assert (job.state, job.request, job.lease_expires, job.created_at) == ("queued", {}, None, 1.0)
    migrated.reset_workers(["w0"])
    migrated.register_worker("w0", "t")
    assert migrated.claim("t").id == "j" and migrated.get("j").lease_expires > job.created_at
    assert videos.size(migrated, "j") is None  # the video tables of version N exist
    migrated._con().execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this wanfast's"):
        JobStore(target)


def test_an_expired_lease_frees_the_job_of_a_worker_still_registered(store, tmp_path):
    """A worker whose host vanished stays registered (nobody fenced it off): its job is the restart rule's
    once the lease its heartbeat renewed has expired, and the worker, should it come back, is fenced."""
    store.max_attempts, store.lease_seconds = 2, 60.0
    store.submit(REQ, 4)
    job = claimed(store, "lost")
    assert job.lease_expires == pytest.approx(job.started_at + 60.0)
    assert store.heartbeat("lost", "busy") and store.get(job.id).lease_expires >= job.lease_expires
    assert store.recover(tmp_path, "lease expired") == {}, "a live lease keeps the job"
    store._con().execute("UPDATE jobs SET lease_expires = lease_expires - 120 WHERE id = ?", (job.id,))
    assert store.recover(tmp_path, "lease of {worker} expired", expired=True) == {job.id: "queued"}
    again = store.get(job.id)
    assert again.owner is None and again.lease_expires is None
    assert again.note == "re-queued: lease of w0 expired at step 0 of ?"
    with pytest.raises(NotOwner):
        store.progress(job.id, "lost", 2, 4, "high_noise", 0.1, 0.1)
    assert store.claim("lost").id == job.id  # still registered: it may take work again, with a new lease
    store.register_worker("w0", None)  # fenced, its lease still live: the pool's to recover, not the reaper's
    assert store.recover(tmp_path, "lease expired", expired=True) == {}
    store._con().execute("UPDATE jobs SET lease_expires = 0 WHERE id = ?", (job.id,))
    assert store.recover(tmp_path, "lease expired") == {job.id: "failed"}  # its second start: not retried
    assert "interrupted 2 times (lease expired" in store.get(job.id).error


def test_concurrent_claims_take_every_job_once(store):
    """Four workers claiming at once from threads (PostgreSQL: FOR UPDATE SKIP LOCKED; SQLite: its one
    write lock): each job is claimed by exactly one."""
    import threading

    ids = {store.submit({"prompt": f"job {i}"}, 100)[0].id for i in range(40)}
    owners = [f"t{i}" for i in range(4)]
    store.reset_workers([f"w{i}" for i in range(4)])
    for i, owner in enumerate(owners):
        store.register_worker(f"w{i}", owner)
    got: dict[str, list[str]] = {o: [] for o in owners}

    def work(owner: str) -> None:
        while (job := store.claim(owner)) is not None:
            got[owner].append(job.id)

    threads = [threading.Thread(target=work, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    taken = [j for js in got.values() for j in js]
    assert sorted(taken) == sorted(ids) and len(set(taken)) == len(ids)
    assert store.counts()["running"] == 40


def test_a_video_is_kept_whole_and_a_too_large_one_fails_its_job(store, tmp_path):
    """On PostgreSQL a video is stored as 1 MiB rows, streamed back in order; one above the store's cap
    fails the job with the reason. On SQLite it is the file (no cap there: the disk is the limit)."""
    from wanfast.server.videos import CHUNK_BYTES

    store.max_video_bytes = 3 * CHUNK_BYTES
    data = bytes(range(256)) * (CHUNK_BYTES * 5 // 2 // 256) + b"tail"  # 2.5 MiB: three chunks
    store.submit(REQ, 4)
    store.submit(REQ, 4)
    for payload in (data, data * 2):
        job = claimed(store)
        tmp, final = tmp_path / f"{job.id}.tmp.mp4", tmp_path / f"{job.id}.mp4"
        tmp.write_bytes(payload)
        state = store.finish(job.id, "w1", "succeeded", result=(tmp, final))
        if payload is data or not store.videos_in_db:
            assert state == "succeeded" and video(store, job.id, final) == payload
            if store.videos_in_db:
                assert (
                    videos.size(store, job.id) == len(data) and len(list(videos.chunks(store, job.id))) == 3
                )
        else:
            assert state == "failed" and video(store, job.id, final) is None
            assert (
                f"the video is {len(payload)} bytes, above this job store's limit" in store.get(job.id).error
            )
        assert not tmp.exists()


def test_an_input_image_reaches_a_worker_on_another_host(store, tmp_path):
    """The web process stores an image under its hash; a worker of a PostgreSQL store without that file
    (another host) gets it written to its own inputs folder. On SQLite (one host) the request is left as
    it is: the worker reads the web process's file."""
    import hashlib

    image = b"\x89PNG not really" * 100
    web = tmp_path / "web" / "inputs" / f"{hashlib.sha256(image).hexdigest()}.img"
    web.parent.mkdir(parents=True)
    web.write_bytes(image)
    videos.put_input(store, web, image)
    videos.put_input(store, web, image)  # a retried submission: stored once, no error
    store.submit({"prompt": "x", "image": str(web)}, 4)
    job = claimed(store)
    local = videos.local_inputs(store, job, tmp_path / "worker" / "inputs")
    if store.videos_in_db:
        fetched = tmp_path / "worker" / "inputs" / web.name
        assert local.request["image"] == str(fetched) and fetched.read_bytes() == image
        assert store.get(job.id).request["image"] == str(web), "the stored request is unchanged"
        missing = replace(job, request={"prompt": "x", "image": str(tmp_path / "nowhere" / "0abc.img")})
        assert videos.local_inputs(store, missing, tmp_path / "w2").request["image"] == str(
            tmp_path / "nowhere" / "0abc.img"
        )
    else:
        assert local == job and not (tmp_path / "worker").exists()


def test_a_lost_postgresql_connection_is_replaced(new_target):
    """The server ends a connection (a restart, a failover): the call that meets it fails with a store error
    (the web process answers 503, a worker retries), and the next call opens a new one."""
    from wanfast.server.storedb import STORE_ERRORS

    store = JobStore(new_target())
    store.submit(REQ, 4)
    if not store.db.postgres:
        assert store.counts()["queued"] == 1  # SQLite: a file, no connection to lose
        return
    pid = store._con().execute("SELECT pg_backend_pid()").fetchone()[0]
    other = Database(store.db.target, 5.0)
    other.con().execute("SELECT pg_terminate_backend(?)", (pid,))
    with pytest.raises(STORE_ERRORS):
        store.counts()
    assert store.counts()["queued"] == 1
