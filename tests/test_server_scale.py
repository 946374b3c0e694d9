"""Beyond one host, on one machine: two API-only web processes and two worker pools (``wanfast worker``,
tiny model, CPU) sharing a throwaway PostgreSQL cluster on loopback. 50 jobs through both APIs, one worker
pool SIGKILLed mid-job as a host that vanishes: every job ends once, every video is served by both APIs,
the counts of /metrics add up."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from wanfast.server.testing import ServerProcess, WorkerProcess, wait_for, wait_job

LONG = {"size": "32x32", "frames": 1}  # tens of ms a step on a CPU: `steps` sets a job's length
LEASE = 3.0  # seconds: how long the job of the killed pool stays running before the rule re-queues it
PASSWORD = "pw-never-in-ps"
N, LONG_STEPS, SHORT_STEPS = 50, 200, 2  # a long job: seconds, time to kill its host mid-way


@pytest.fixture(scope="module")
def fleet(postgres, tmp_path_factory):
    """(store URL, [api0, api1], [host0, host1]), all started and both workers up."""
    url, root = postgres.new_database(), tmp_path_factory.mktemp("scale")
    # the workers take the URL from the environment, with a password (the test cluster trusts loopback and
    # ignores it): it must show in no command line
    secret = url.replace("wanfast@", f"wanfast:{PASSWORD}@")
    hosts = [WorkerProcess(root / f"host{i}", "--lease-seconds", str(LEASE), "--pool-name", f"host{i}",
                           env={"WANFAST_STORE": secret}) for i in range(2)]  # fmt: skip
    apis = [ServerProcess(root / f"api{i}", "--api-only", "--store", url, "--queue-size", "64",
                          "--max-steps", "1000", wait_workers=False) for i in range(2)]  # fmt: skip
    try:
        for host in hosts:
            host.start()
        with ThreadPoolExecutor(2) as ex:  # the processes load at once: start-up is most of this test
            list(ex.map(lambda api: api.start(timeout=180), apis))
        with apis[1].client() as c:
            wait_for(lambda: c.get("/health").json()["workers_up"] == 2, 180, "both worker pools")
        yield url, apis, hosts
    finally:
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda proc: proc.stop(), (*apis, *hosts)))
        for host in hosts:
            print(host.log(), file=sys.stderr)  # shown when the test fails


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # a process that ended meanwhile
        return b""


def metrics(client) -> dict[str, float]:
    samples = (line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines() if line[:1] != "#")
    return {name: float(value) for name, value in samples}


def test_two_apis_two_pools_one_pool_killed_mid_job(fleet):
    import psycopg

    url, apis, hosts = fleet
    shown = [p for p in Path("/proc").glob("[0-9]*/cmdline") if PASSWORD.encode() in _read(p)]
    assert not shown, "the store's password is visible in a process's command line"
    clients = [api.client() for api in apis]
    ids = []

    def submit(numbers: range) -> None:  # through both APIs in turn
        for i in numbers:
            body = {"prompt": f"job {i}", "seed": i, "steps": LONG_STEPS if i < 2 else SHORT_STEPS, **LONG}
            r = clients[i % 2].post("/v1/videos", json=body)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])

    def on_host0():
        listed = clients[0].get("/v1/videos", params={"state": "running"}).json()["data"]
        return next((j for j in listed if (j["worker"] or "").startswith("host0-")), None)

    # the first two jobs are long, so each pool is in the middle of one when host0 is killed (the 50
    # submissions take longer than a long job on a fast machine: the rest come after the kill)
    submit(range(10))
    victim = wait_for(on_host0, 60, "a job running on host0")
    victim = wait_job(clients[0], victim["id"], lambda j: j["progress"]["step"] >= 2, 30)
    assert victim["state"] == "running" and victim["progress"]["steps"] == LONG_STEPS
    hosts[0].kill()  # no handler runs, nobody fences its token: only the lease frees the job
    submit(range(10, N))

    def all_ended():
        listed = clients[1].get("/v1/videos", params={"limit": 1000}).json()
        return listed if all(j["state"] not in ("queued", "running") for j in listed["data"]) else None

    listed = wait_for(all_ended, 120, "every job to end", interval=0.5)
    assert listed["total"] == N and sorted(j["id"] for j in listed["data"]) == sorted(ids)
    jobs = {j["id"]: j for j in listed["data"]}
    assert all(j["state"] == "succeeded" for j in jobs.values()), [j["error"] for j in jobs.values()]
    # the killed job: re-queued once by the rule (a second start, counted), then run on host1
    again = jobs[victim["id"]]
    assert again["attempts"] == 2 and again["worker"] == "host1-w0"
    assert again["note"].startswith(
        f"re-queued: the lease of worker {victim['worker']} expired (no heartbeat) at step "
    )
    assert [j["attempts"] for i, j in jobs.items() if i != victim["id"]] == [1] * (N - 1)

    # every video, from both APIs, byte for byte the same: an MP4 (its first box is ftyp)
    for job_id in ids:
        a, b = (c.get(f"/v1/videos/{job_id}/content") for c in clients)
        assert a.status_code == b.status_code == 200 and a.content == b.content
        assert a.content[4:8] == b"ftyp" and int(a.headers["content-length"]) == len(a.content)
    with psycopg.connect(url) as con:  # one stored video per job: none twice, none half
        assert con.execute("SELECT COUNT(*), COUNT(DISTINCT job_id) FROM videos").fetchone() == (N, N)
        stored = con.execute("SELECT SUM(size) FROM videos").fetchone()[0]
        assert con.execute("SELECT SUM(octet_length(data)) FROM video_chunks").fetchone()[0] == stored

    # both APIs count the same jobs, and the counts add up
    steps = 2 * LONG_STEPS + (N - 2) * SHORT_STEPS
    for c in clients:
        m = metrics(c)
        by_state = {
            s: m[f'wanfast_jobs{{state="{s}"}}']
            for s in ("queued", "running", "succeeded", "failed", "cancelled")
        }
        assert by_state == {"queued": 0, "running": 0, "succeeded": N, "failed": 0, "cancelled": 0}
        assert m["wanfast_step_seconds_count"] == steps and m["wanfast_queue_depth"] == 0
        assert m['wanfast_rejected_total{reason="queue_full"}'] == 0 and m["wanfast_workers"] == 2
        assert m['wanfast_worker_up{worker="host1-w0",gpus=""}'] == 1
        # host0 is shown down once its last heartbeat is older than app.HEARTBEAT_STALE_SECONDS
        host0 = 'wanfast_worker_up{worker="host0-w0",gpus=""}'
        wait_for(lambda c=c, k=host0: metrics(c)[k] == 0, 15, "host0 to be shown down")
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert {w["name"]: w["up"] for w in health.json()["workers"]} == {"host0-w0": False, "host1-w0": True}
    for c in clients:
        c.close()


def test_serve_with_both_roles_joins_the_same_store(fleet, tmp_path):
    """``wanfast serve --store URL`` (web process and its own pool) on the store of the fleet: its /health
    shows its own worker (by its process) beside the others (by their heartbeats), and its jobs are run
    by whichever worker is free; its videos are served by the API-only processes too."""
    url, apis, _ = fleet
    both = ServerProcess(tmp_path / "both", "--store", url, "--pool-name", "both", "--max-steps", "1000",
                         wait_workers=False).start(timeout=180)  # fmt: skip
    try:
        with both.client() as c, apis[0].client() as other:

            def workers_up():
                health = c.get("/health").json()
                return {w["name"]: w["up"] for w in health["workers"]}

            wait_for(lambda: workers_up().get("both-w0"), 120, "its own worker")
            assert workers_up() == {"both-w0": True, "host1-w0": True, "host0-w0": False}
            ids = [
                c.post("/v1/videos", json={"prompt": f"b{i}", "steps": 2, **LONG}).json()["id"]
                for i in range(4)
            ]
            done = [wait_job(c, i, lambda j: j["state"] == "succeeded", 60) for i in ids]
            assert {j["worker"] for j in done} <= {"both-w0", "host1-w0"}
            for job_id in ids:
                assert (
                    c.get(f"/v1/videos/{job_id}/content").content
                    == other.get(f"/v1/videos/{job_id}/content").content
                )
    finally:
        both.stop()
