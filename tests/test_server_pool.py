"""The worker pool with real server processes (tiny model, CPU) on loopback: two workers run two jobs at
once; a worker SIGKILLed or SIGSTOPped mid-job is replaced and its job re-run while the other's jobs
finish; 50 concurrent submissions all end exactly once; a two-process worker (CFG-parallel over gloo)
runs, cancels and survives the death of a rank; a store that cannot be written when a worker dies."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest

from wanfast.server.testing import ServerProcess, burst, wait_final, wait_for, wait_job

LONG = {"size": "32x32", "frames": 1}  # tens of ms a step on a CPU: `steps` sets a job's length
HANG = 15  # --worker-timeout: a heartbeat thread on a loaded 2-core machine can be starved for seconds


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    args = ("--workers", "2", "--queue-size", "64", "--max-steps", "1000", "--worker-timeout", str(HANG))
    with ServerProcess(tmp_path_factory.mktemp("pool"), *args) as srv:
        yield srv


def submit(client, **body) -> dict:
    r = client.post("/v1/videos", json={"prompt": "a red fox in the snow", **body})
    assert r.status_code == 202, r.text
    return r.json()


def two_running(server, client) -> tuple[dict, dict]:
    """Two long jobs, running at the same time on the two workers."""
    a, b = submit(client, steps=400, **LONG), submit(client, steps=400, **LONG)

    def both():
        jobs = [client.get(f"/v1/videos/{j['id']}").json() for j in (a, b)]
        return jobs if all(j["state"] == "running" and j["progress"]["step"] >= 2 for j in jobs) else None

    jobs = wait_for(both, 60, "both jobs to run at once", interval=0.1)
    assert {j["worker"] for j in jobs} == {"w0", "w1"}, jobs
    return jobs[0], jobs[1]


def metrics(client) -> dict[str, float]:
    lines = client.get("/metrics").text.splitlines()
    return {n: float(v) for n, v in (line.rsplit(" ", 1) for line in lines if not line.startswith("#"))}


def label(name: str) -> str:
    return f'{{worker="{name}",gpus=""}}'


def interrupted(server, client, sig: signal.Signals, reason: str) -> None:
    """One of two running workers gets ``sig``: its job is re-run by the restart rule (attempt 2) after
    its worker is replaced; the other worker's job finishes untouched."""
    victim, other = two_running(server, client)
    before = metrics(client)[f"wanfast_worker_restarts_total{label(victim['worker'])}"]
    pid = server.workers()[(victim["worker"], 0)]
    os.kill(pid, sig)
    done = wait_final(client, victim["id"], timeout=120)
    assert done["state"] == "succeeded" and done["attempts"] == 2, done
    assert done["note"].startswith(f"re-queued: worker {victim['worker']} {reason} at step "), done["note"]
    kept = wait_final(client, other["id"], timeout=120)
    assert kept["state"] == "succeeded" and kept["attempts"] == 1 and kept["note"] is None, (
        kept["note"],
        kept,
    )
    assert kept["worker"] == other["worker"]
    assert pid not in server.worker_pids(), "the old process must be gone (killed, not left stopped)"
    after = metrics(client)
    assert after[f"wanfast_worker_restarts_total{label(victim['worker'])}"] == before + 1
    wait_for(lambda: client.get("/health").json()["status"] == "ok", 60, "both workers to be up again")


def test_two_workers_run_two_jobs_at_once_and_report_each(pool):
    with pool.client() as c:
        a, b = two_running(pool, c)
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["workers_up"] == 2
        assert [(w["name"], w["state"], w["device"]) for w in h["workers"]] == [
            ("w0", "busy", "cpu"),
            ("w1", "busy", "cpu"),
        ]
        m = metrics(c)
        assert m["wanfast_workers"] == 2
        assert all(m[f"wanfast_worker_{k}{label(w)}"] == 1 for k in ("up", "busy") for w in ("w0", "w1")), m
        for job in (a, b):
            assert wait_final(c, job["id"])["state"] == "succeeded"


def test_sigkill_of_one_worker_mid_job(pool):
    with pool.client() as c:
        interrupted(pool, c, signal.SIGKILL, "exited with code -9")


def test_sigstop_of_one_worker_mid_job(pool):
    """A stopped process is alive but does nothing: its heartbeat stops, so it counts as hung."""
    with pool.client() as c:
        interrupted(pool, c, signal.SIGSTOP, f"hung (no heartbeat for {HANG} s)")


def test_50_concurrent_submissions_each_run_exactly_once(pool):
    responses = burst(pool, {"prompt": "many", "steps": 1, **LONG}, n=50)
    assert [r.status_code for r in responses] == [202] * 50
    ids = {r.json()["id"] for r in responses}
    with pool.client() as c:
        done = [wait_final(c, i, timeout=120) for i in ids]
    assert len(ids) == 50 and all(j["state"] == "succeeded" and j["attempts"] == 1 for j in done)
    assert {j["worker"] for j in done} == {"w0", "w1"}, "both workers take jobs"
    videos = {p.name for p in (pool.data_dir / "results").iterdir()}
    assert {f"{i}.mp4" for i in ids} <= videos and not [v for v in videos if ".tmp." in v]


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """One worker of two processes (gloo on the CPU): every video is split CFG-parallel over them. The
    web process's store gives up on a lock after 1 s (--db-timeout), for the unwritable-store test."""
    args = ("--workers", "1", "--gpus-per-worker", "2", "--max-steps", "1000", "--db-timeout", "1")
    with ServerProcess(tmp_path_factory.mktemp("split"), *args) as srv:
        yield srv


def test_a_two_process_worker_runs_and_cancels(split):
    assert sorted(split.workers()) == [("w0", 0), ("w0", 1)]
    with split.client() as c:
        assert c.get("/health").json()["workers"][0]["device"] == "cpu x2"
        done = wait_final(c, submit(c, steps=3, **LONG)["id"])
        assert done["state"] == "succeeded" and done["progress"]["step"] == 3, done
        job = wait_job(c, submit(c, steps=1000, **LONG)["id"], lambda j: j["progress"]["step"] >= 2, 60)
        c.delete(f"/v1/videos/{job['id']}")
        stopped = wait_final(c, job["id"])  # rank 0 broadcasts the flag: both ranks stop at the same step
        assert stopped["state"] == "cancelled" and "cancelled by request at step" in stopped["error"]
        wait_final(c, submit(c, steps=2, **LONG)["id"])  # the ranks are still in step with each other


def test_store_unwritable_when_a_worker_dies(split):
    """The job of a worker that died while the database was locked used to stay running for ever (a
    DELETE then did nothing): the rule is now retried until the store takes it, before the worker
    restarts; the job is re-queued, runs again, and a DELETE stops it."""
    with split.client() as c:
        job = wait_job(c, submit(c, steps=1000, **LONG)["id"], lambda j: j["progress"]["step"] >= 2, 60)
        lock = sqlite3.connect(split.data_dir / "jobs.db", timeout=30, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # no writer gets in; readers still do (WAL)
        try:
            os.kill(split.workers()[("w0", 1)], signal.SIGKILL)  # a rank dies: the whole worker goes
            wait_for(lambda: "the job store failed" in split.log(), 30, "the rule to fail on the lock")
            assert c.get(f"/v1/videos/{job['id']}").json()["state"] == "running"  # nothing can change it yet
            assert c.delete(f"/v1/videos/{job['id']}").status_code == 503  # and says so
            time.sleep(1.5)  # a retry or two more
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        again = wait_job(c, job["id"], lambda j: j["attempts"] == 2 and j["progress"]["step"] >= 2, 120)
        assert again["note"].startswith("re-queued: worker w0 rank 1 exited with code -9 at step "), again
        assert c.delete(f"/v1/videos/{job['id']}").json()["cancel_requested"]
        assert wait_final(c, job["id"])["state"] == "cancelled"


def test_generate_prompts_file_on_two_workers_equals_one_process(tmp_path):
    """`generate --prompts-file --workers 2`: every line's video equals the one-process run of that line.
    Exact: the same code (WanPipeline.run, write_mp4) on the same device with the same thread count
    (the reference runs with the pool's per-process share), so the same float operations in the same order."""
    import json
    import subprocess
    import sys

    import torch

    from wanfast.api import tiny_pipeline
    from wanfast.video import read_mp4, write_mp4

    lines = [{"prompt": "a fox", "seed": 1, "frames": 5, "steps": 2},
             {"prompt": "a cat", "seed": 2, "size": "32x32", "steps": 2, "fps": 8},
             {"prompt": "a dog", "seed": 3, "frames": 1, "steps": 3, "output": str(tmp_path / "dog.mp4")}]  # fmt: skip
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in lines))
    cmd = [sys.executable, "-m", "wanfast", "generate", "--model", "tiny", "--device", "cpu", "--workers", "2",
           "--prompts-file", str(prompts), "--output", str(tmp_path / "out.mp4")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 prompts on 2 workers" in proc.stderr and "total: 3 prompts, 3 done, 0 failed" in proc.stdout

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, ((os.cpu_count() or 2) - 1) // 2))  # the pool's share per worker
    try:
        pipe = tiny_pipeline("cpu")
        for i, (line, out) in enumerate(zip(lines, ["out_0.mp4", "out_1.mp4", "dog.mp4"], strict=True)):
            over = {k: v for k, v in line.items() if k not in ("prompt", "fps", "output", "size")}
            if "size" in line:
                over["width"], over["height"] = map(int, line["size"].split("x"))
            result = pipe.run(pipe.params(line["prompt"], **over))
            write_mp4(result.frames, tmp_path / f"ref_{i}.mp4", fps=line.get("fps", 16))
            (got, fps), (want, want_fps) = read_mp4(tmp_path / out), read_mp4(tmp_path / f"ref_{i}.mp4")
            assert fps == want_fps and got.shape == want.shape and (got == want).all(), line
    finally:
        torch.set_num_threads(threads)
