"""Nothing accepted is lost or duplicated: SIGKILL of the server mid-job, a worker crash, a second server
on the same data directory. A real server process (tiny model, CPU) on loopback."""

from __future__ import annotations

import os
import signal

import pytest

from wanfast.config import ConfigError
from wanfast.server.cli import _lock
from wanfast.server.jobs import JobStore
from wanfast.server.testing import ServerProcess, burst, wait_final, wait_for, wait_job

LONG = {"size": "32x32", "frames": 1}
ARGS = ("--queue-size", "64", "--max-steps", "1000")


def results(data_dir) -> set[str]:
    return {p.name for p in (data_dir / "results").iterdir()}


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """Three jobs accepted, the server SIGKILLed during the first, then started again on the same data.
    Yields (running server, data dir, accepted ids, step the first job had reached)."""
    data = tmp_path_factory.mktemp("restart")
    first = ServerProcess(data, *ARGS, "--no-prelaunch").start()  # the plain start; the second prelaunches
    try:
        with first.client() as c:
            ids = [
                c.post("/v1/videos", json={"prompt": f"job {i}", "steps": 150, **LONG}).json()["id"]
                for i in range(3)
            ]
            job = wait_job(c, ids[0], lambda j: j["state"] == "running" and j["progress"]["step"] >= 5, 30)
        assert first.worker_pids(), "the worker should be running"
        first.kill()
        # the worker must follow its server at once: a leftover would still hold the GPU
        wait_for(lambda: not first.worker_pids(), 10, "the orphaned worker to exit")
        second = ServerProcess(data, *ARGS).start()
    finally:
        first.stop()
    yield second, data, ids, job["progress"]["step"]
    second.stop()


def test_sigkill_mid_job_every_accepted_job_is_accounted_for(restarted):
    server, data, ids, step = restarted
    with server.client() as c:
        final = [wait_final(c, job_id) for job_id in ids]
        listed = c.get("/v1/videos", params={"limit": 1000}).json()
    assert [j["state"] for j in final] == ["succeeded"] * 3, final
    # the rule: the interrupted job went back to the queue, keeping its place, and ran again
    assert final[0]["attempts"] == 2 and final[0]["note"].startswith("re-queued: server restarted at step ")
    assert int(final[0]["note"].split("at step ")[1].split()[0]) >= step
    assert final[0]["started_at"] < final[1]["started_at"] < final[2]["started_at"]
    assert [j["attempts"] for j in final[1:]] == [1, 1] and final[1]["note"] is None
    assert listed["total"] == 3 and sorted(j["id"] for j in listed["data"]) == sorted(ids)
    assert results(data) == {f"{i}.mp4" for i in ids}, "one video per job, no leftovers"


def test_worker_crash_requeues_its_job_and_a_new_worker_runs_it(restarted):
    server, data, _, _ = restarted
    with server.client() as c:
        job = c.post("/v1/videos", json={"prompt": "crash", "steps": 150, **LONG}).json()
        wait_job(c, job["id"], lambda j: j["state"] == "running" and j["progress"]["step"] >= 2, 30)
        (pid,) = server.worker_pids()
        os.kill(pid, signal.SIGKILL)
        done = wait_final(c, job["id"], timeout=90)
        assert done["state"] == "succeeded" and done["attempts"] == 2
        assert done["note"].startswith("re-queued: worker w0 exited with code -9 at step ")
        assert 'wanfast_worker_restarts_total{worker="w0",gpus=""} 1' in c.get("/metrics").text

        def healthy():
            h = c.get("/health").json()
            return (
                h["status"] == "ok"
                and h["workers"][0]["state"] == "ready"
                and h["workers"][0]["restarts"] == 1
            )

        wait_for(healthy, 5, "the new worker to be idle and healthy")
    assert f"{job['id']}.mp4" in results(data)


def test_a_second_server_on_the_same_data_is_refused(restarted):
    """Two servers on one data directory would run every job twice; ``serve`` takes this lock first."""
    server, data, _, _ = restarted
    with pytest.raises(ConfigError, match=f"another wanfast server is using {data}"):
        _lock(data)
    with server.client() as c:
        assert c.get("/health").status_code == 200


def test_50_concurrent_submissions_within_the_bound_all_complete(restarted):
    server, data, _, _ = restarted
    responses = burst(server, {"prompt": "many", "steps": 1, **LONG}, n=50)
    assert [r.status_code for r in responses] == [202] * 50
    ids = {r.json()["id"] for r in responses}
    with server.client() as c:
        assert all(wait_final(c, i)["state"] == "succeeded" for i in ids) and len(ids) == 50
    assert {f"{i}.mp4" for i in ids} <= results(data)


def test_clean_stop_requeues_the_running_job_without_counting_it(restarted):
    server, data, _, _ = restarted
    with server.client() as c:
        job = c.post("/v1/videos", json={"prompt": "stop", "steps": 1000, **LONG}).json()
        wait_job(c, job["id"], lambda j: j["state"] == "running" and j["progress"]["step"] >= 2, 30)
    server.stop()  # SIGTERM
    assert server.proc.returncode == 0 and not server.worker_pids()
    stored = JobStore(data / "jobs.db").get(job["id"])
    assert (
        stored.state == "queued"
        and stored.attempts == 0
        and stored.note.startswith("re-queued: server stopped")
    )
