"""The HTTP API against a real server process (tiny model, CPU) on loopback, through a real HTTP client."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from wanfast.server.testing import ServerProcess, burst, wait_final, wait_for, wait_job
from wanfast.video import read_mp4

KEY = "test-key-123"
LONG = {"size": "32x32", "frames": 1}  # about 10 ms a step on a CPU: `steps` sets a job's length
QUEUE = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ("--queue-size", str(QUEUE), "--max-steps", "1000")
    with ServerProcess(tmp_path_factory.mktemp("api"), *args, api_key=KEY) as srv:
        yield srv


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def submit(client, **body) -> dict:
    r = client.post("/v1/videos", json={"prompt": "a red fox in the snow", **body})
    assert r.status_code == 202, r.text
    return r.json()


def running(client, **body) -> dict:
    """Submit a job and wait until it has run a step."""
    job = submit(client, **body)
    return wait_job(client, job["id"], lambda j: j["state"] == "running" and j["progress"]["step"] >= 1, 30)


def test_submit_poll_and_fetch_a_playable_mp4(client, tmp_path):
    job = submit(client, frames=5, seed=3, fps=8)
    assert job["state"] in ("queued", "running") and job["request"]["frames"] == 5
    assert job["progress"]["steps"] == 4 and job["content_url"] is None
    done = wait_final(client, job["id"])
    assert done["state"] == "succeeded", done
    assert done["progress"]["step"] == done["progress"]["steps"] == 4  # the tiny preset's default steps
    assert done["params"]["width"] == 64 and done["params"]["seed"] == 3 and done["attempts"] == 1
    assert {"text_encoding", "denoise", "vae_decode", "total", "write_mp4"} <= set(done["timings"])
    r = client.get(done["content_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    (tmp_path / "out.mp4").write_bytes(r.content)
    frames, fps = read_mp4(tmp_path / "out.mp4")
    assert frames.shape == (5, 48, 64, 3) and fps == 8
    part = client.get(done["content_url"], headers={"Range": "bytes=0-99"})  # what a <video> asks for
    assert part.status_code == 206 and part.content == r.content[:100]


def test_cfg_steps_and_step_cache_threshold_reach_the_worker(client):
    job = submit(client, steps=3, cfg_steps=1, step_cache_threshold=0.05, **LONG)
    assert job["request"]["cfg_steps"] == 1 and job["request"]["step_cache_threshold"] == 0.05
    done = wait_final(client, job["id"])
    assert done["state"] == "succeeded", done
    assert (done["params"]["cfg_steps"], done["params"]["step_cache_threshold"]) == (1, 0.05)
    r = client.post("/v1/videos", json={"prompt": "x", "cfg_steps": -1})
    assert r.status_code == 422 and "cfg_steps" in r.json()["detail"]


def test_progress_is_streamed_as_server_sent_events(client):
    job = submit(client, steps=150, **LONG)
    events, deadline = [], time.monotonic() + 60
    with client.stream("GET", f"/v1/videos/{job['id']}/events", timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            assert time.monotonic() < deadline, "the event stream did not end"
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
                if kind == "done":
                    break
    assert events[-1][0] == "done" and events[-1][1]["state"] == "succeeded"
    steps = [e["progress"]["step"] for k, e in events if k == "progress" and e["state"] == "running"]
    assert len(set(steps)) >= 2 and steps == sorted(steps), steps
    etas = [e["progress"]["eta_seconds"] for k, e in events if k == "progress" and e["progress"]["step"] > 0]
    assert etas and all(eta is not None and eta >= 0 for eta in etas)


def test_cancel_a_queued_and_a_running_job(client):
    first = running(client, steps=1000, **LONG)
    queued = submit(client, **LONG)
    r = client.delete(f"/v1/videos/{queued['id']}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    r = client.delete(f"/v1/videos/{first['id']}")
    assert r.status_code == 200 and r.json()["cancel_requested"]
    stopped = wait_final(client, first["id"], timeout=30)
    assert stopped["state"] == "cancelled" and "cancelled by request at step" in stopped["error"]
    assert stopped["progress"]["step"] < 1000
    assert client.delete(f"/v1/videos/{first['id']}").status_code == 409
    r = client.get(f"/v1/videos/{first['id']}/content")
    assert r.status_code == 409 and "only a succeeded job has a video" in r.json()["detail"]
    assert client.get(f"/v1/videos/{queued['id']}").json()["started_at"] is None


def test_list_filters_and_pages(client):
    ids = [submit(client, steps=1, **LONG)["id"] for _ in range(3)]
    for job_id in ids:
        wait_final(client, job_id)
    page = client.get("/v1/videos", params={"limit": 2}).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["total"] >= 3
    rest = client.get("/v1/videos", params={"limit": 2, "offset": 2}).json()
    assert rest["data"][0]["id"] == ids[0]
    done = client.get("/v1/videos", params={"state": "succeeded", "limit": 1000}).json()
    assert set(ids) <= {j["id"] for j in done["data"]} and all(
        j["state"] == "succeeded" for j in done["data"]
    )


def test_bad_inputs_get_clear_4xx_and_leave_the_running_job_alone(server, client):
    job = running(client, steps=600, **LONG)
    bad_bodies = [
        ({"prompt": "x", "size": "100x100"}, 422, "width must be a positive multiple of 16"),
        ({"prompt": "x", "size": "big"}, 422, "size: String should match pattern"),
        ({"prompt": "x", "frames": 10}, 422, "frames must be 4n+1"),
        ({"prompt": "x", "steps": -3}, 422, "steps must be an integer >= 1, got -3"),
        ({"prompt": "x", "steps": "many"}, 422, "steps: Input should be a valid integer"),
        ({"prompt": "x" * 2001}, 422, "prompt has 2001 characters; this server accepts at most 2000"),
        ({"prompt": ""}, 422, "prompt: String should have at least 1 character"),
        ({"prompt": "x", "solver": "magic"}, 422, "solver: Input should be"),
        ({"prompt": "x", "sampler": "euler"}, 422, "sampler: Extra inputs are not permitted"),
        ({"steps": 4}, 422, "prompt: Field required"),
        ({"prompt": "x" * 100_000}, 413, "request body larger than 65536 bytes"),
    ]
    for body, status, message in bad_bodies:
        r = client.post("/v1/videos", json=body)
        assert r.status_code == status and message in r.json()["detail"], (body, r.text)
    r = client.post("/v1/videos", content=b'{"prompt": "x",', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "JSON decode error" in r.json()["detail"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}):
        r = httpx.post(f"{server.url}/v1/videos", json={"prompt": "x"}, headers=headers, timeout=10)
        assert r.status_code == 401 and "API key" in r.json()["detail"]
    assert client.get("/v1/videos/not-a-uuid").status_code == 404
    assert client.get("/v1/videos", params={"state": "bogus"}).status_code == 422
    assert client.get(f"/v1/videos/{job['id']}").json()["state"] == "running", "the job must still be running"
    done = wait_final(client, job["id"])
    assert done["state"] == "succeeded" and done["attempts"] == 1 and done["progress"]["step"] == 600


def test_api_key_on_every_route_but_health(server, client):
    r = httpx.get(f"{server.url}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["workers_up"] == 1
    assert r.json()["workers"][0]["state"] in ("ready", "busy") and r.json()["workers"][0]["device"] == "cpu"
    for path in ("/", "/docs", "/openapi.json", "/metrics", "/v1/videos"):
        r = httpx.get(f"{server.url}{path}", timeout=10)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
    assert client.get("/v1/videos", headers={"Authorization": "", "X-API-Key": KEY}).status_code == 200
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    page = httpx.get(f"{server.url}/", headers={"Authorization": f"Basic {basic}"}, timeout=10)
    assert page.status_code == 200 and '<form id="form">' in page.text and '"size": "64x48"' in page.text
    docs = client.get("/docs").text
    assert "<code>/v1/videos/{job_id}/events</code>" in docs and "step_cache_threshold" in docs
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/videos", "/v1/videos/{job_id}", "/v1/videos/{job_id}/events", "/health"} <= set(paths)


def test_idempotent_retry_creates_one_job(client):
    headers = {"Idempotency-Key": "retry-42"}
    first = client.post("/v1/videos", json={"prompt": "once", **LONG}, headers=headers)
    again = client.post("/v1/videos", json={"prompt": "once", **LONG}, headers=headers)
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    assert wait_final(client, first.json()["id"])["state"] == "succeeded"


def test_metrics_in_prometheus_format(client):
    wait_final(client, submit(client, steps=2, **LONG)["id"])
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in r.text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    w0 = '{worker="w0",gpus=""}'
    assert samples["wanfast_queue_capacity"] == QUEUE and samples[f"wanfast_worker_up{w0}"] == 1
    assert samples['wanfast_jobs{state="succeeded"}'] >= 1 and "wanfast_queue_depth" in samples
    assert samples["wanfast_step_seconds_count"] >= 2 and samples["wanfast_step_seconds_sum"] > 0
    assert samples[f"wanfast_gpu_memory_allocated_bytes{w0}"] == 0  # a CPU worker
    assert samples[f"wanfast_worker_restarts_total{w0}"] == 0 and samples["wanfast_workers"] == 1
    wait_for(lambda: client.get("/metrics").status_code == 200, 5, "metrics")


def test_50_concurrent_submissions_complete_or_get_429(client, server):
    before = client.get("/v1/videos").json()["total"]
    responses = burst(server, {"prompt": "a crowd", "steps": 60, **LONG}, n=50)
    accepted = [r.json()["id"] for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code == 429]
    assert len(accepted) + len(refused) == 50, [r.status_code for r in responses]
    assert QUEUE <= len(accepted) < 50 and len(set(accepted)) == len(accepted)
    assert all("queue is full" in r.json()["detail"] and r.headers["retry-after"] for r in refused)
    for job_id in accepted:
        assert wait_final(client, job_id)["state"] == "succeeded"
    assert client.get("/v1/videos").json()["total"] == before + len(accepted)
    metrics = client.get("/metrics").text
    assert f'wanfast_rejected_total{{reason="queue_full"}} {len(refused)}' in metrics


def test_page_in_headless_chromium_submits_watches_and_plays(server):
    """Debian's chromium and chromium-driver (installed by .ci/run); a missing browser fails this test."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
    ):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))
    try:
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(10)
        driver.get(f"http://user:{KEY}@127.0.0.1:{server.port}/")  # HTTP Basic: the key as the password
        for field, value in (
            ("prompt", "a fox in the snow"),
            ("size", "32x32"),
            ("frames", "5"),
            ("steps", "300"),
        ):
            driver.find_element(By.ID, field).send_keys(value)
        driver.find_element(By.ID, "submit").click()
        read = "const $ = (id) => document.getElementById(id); const v = $('video'); return [$('state').textContent, "
        read += "$('detail').textContent, $('error').textContent, v.readyState, v.currentTime, v.paused, v.videoWidth]"
        seen = []

        def playing():
            seen.append(driver.execute_script(read))
            state, _, error, ready, current_time, paused, width = seen[-1]
            assert state not in ("failed", "cancelled") and not error, seen[-1]
            return state == "succeeded" and ready >= 2 and current_time > 0 and not paused and width == 32

        wait_for(playing, 60, "the video to play", interval=0.1)
        assert any(s[0] == "running" and s[1].startswith("step ") and " of 300" in s[1] for s in seen), seen
    finally:
        driver.quit()


def test_serve_flags_reach_the_worker_settings(tmp_path):
    """`wanfast serve` engine switches -> the worker's JSON config -> its EngineSettings."""
    from wanfast.cli import build_parser
    from wanfast.server.cli import worker_config
    from wanfast.server.worker import worker_settings

    argv = ["serve", "--model", "tiny", "--device", "cpu", "--quant", "fp8", "--self-attention", "sdpa",
            "--offload", "blocks", "--t5-cpu", "--no-compile", "--compile-mode", "max-autotune"]  # fmt: skip
    settings = worker_settings(worker_config(build_parser().parse_args(argv), tmp_path))
    assert (settings.quant, settings.self_attention_backend, settings.offload) == ("fp8", "sdpa", "blocks")
    assert settings.text_encoder_device == "cpu" and settings.compile is False
    assert settings.compile_mode == "max-autotune"
    default = worker_settings(
        worker_config(build_parser().parse_args(["serve", "--model", "tiny"]), tmp_path)
    )
    assert default.compile is None and default.compile_mode is None and default.quant is None


def test_hostile_inputs_are_refused_at_the_door_while_a_job_runs(server, client):
    """Each case once crashed (500), hung or poisoned the server: now a 4xx with a message, and the job
    list still answers after every one."""
    job = running(client, steps=1000, **LONG)
    raw = [  # JSON the standard parser accepts, sent as bytes
        ('{"prompt": "x", "negative_prompt": "\\udfff"}', "negative_prompt: Value error, contains a lone UTF-16 surrogate"),
        ('{"prompt": "\\ud800"}', "prompt: Input should be a valid string"),
        ('{"prompt": "x", "frames": true}', "frames: Input should be a valid integer"),
        ('{"prompt": "x", "frames": "9"}', "frames: Input should be a valid integer"),
        ('{"prompt": "x", "seed": "5"}', "seed: Input should be a valid integer"),
        ('{"prompt": "x", "seed": 1e3}', "seed: Input should be a valid integer"),
        ('{"prompt": "x", "size": "\u0666\u0664x\u0664\u0668"}', "size: String should match pattern '^[0-9]"),
        ('{"prompt": "x", "size": "4096x4096", "frames": 1001, "steps": 1000}',
         "4096x4096 x 1001 frames is 16,793,993,216 pixel-frames; this server accepts at most 69,120"),
        ('{"prompt": "x", "steps": 1001}', "steps: Input should be less than or equal to 1000"),
    ]  # fmt: skip
    for field in ("frames", "steps", "seed", "cfg_steps", "fps"):  # integers
        raw += [(f'{{"prompt": "x", "{field}": {v}}}', f"{field}: Input should be a valid integer")
                for v in ("NaN", "Infinity", "-Infinity", "1e309")]  # fmt: skip
    for field in ("shift", "guidance_high_noise", "guidance_low_noise", "boundary", "step_cache_threshold"):
        raw += [(f'{{"prompt": "x", "{field}": {v}}}', f"{field}: Input should be a finite number")
                for v in ("NaN", "Infinity", "-Infinity", "1e309")]  # fmt: skip
    json_type = {"Content-Type": "application/json"}
    cases = [(body.encode(), json_type, 422, message) for body, message in raw]
    cases += [
        (b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 415, "must be JSON (Content-Type: application/json), not text/plain"),
        (b"prompt=x", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "not application/x-www-form-urlencoded"),
        (b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--b--\r\n',
         {"Content-Type": "multipart/form-data; boundary=b"}, 415, "not multipart/form-data"),
        (b'{"prompt": "x"}', {"Content-Type": ""}, 415, "not none"),
    ]  # fmt: skip
    for body, headers, status, message in cases:
        r = client.post("/v1/videos", content=body, headers=headers)
        assert r.status_code == status and message in r.json()["detail"], (body, r.status_code, r.text)
        assert "input" not in json.dumps(r.json().get("errors", [])), "a 422 must not echo the input"
        assert client.get("/v1/videos").status_code == 200, body
    r = client.get("/v1/videos", params={"offset": 9223372036854775808})
    assert r.status_code == 422 and "offset: Input should be less than or equal to" in r.json()["detail"]
    r = client.get("/v1/videos", headers={"Host": "evil.example.com"})  # DNS rebinding, even with the key
    assert r.status_code == 400 and "does not answer to Host 'evil.example.com'" in r.json()["detail"]
    first = client.post("/v1/videos", json={"prompt": "a", **LONG}, headers={"Idempotency-Key": "same"})
    other = client.post("/v1/videos", json={"prompt": "b", **LONG}, headers={"Idempotency-Key": "same"})
    assert first.status_code == 202 and other.status_code == 422
    assert f"was used for a different request (job {first.json()['id']})" in other.json()["detail"]
    listed = client.get("/v1/videos", params={"limit": 1000})
    assert listed.status_code == 200 and listed.json()["total"] == len(listed.json()["data"])
    assert client.get(f"/v1/videos/{job['id']}").json()["state"] == "running", "the job must still be running"
    client.delete(f"/v1/videos/{job['id']}")


def test_a_cancel_during_the_vae_decode_is_honoured(server, client):
    """The decode stage is shown (not the last step with ETA 0), and a DELETE during it ends the job
    cancelled with no video, instead of answering cancel_requested and then succeeding."""
    job = submit(client, size="64x48", frames=17, steps=2)

    def decoding_or_ended(j: dict) -> bool:
        return j["progress"]["stage"] == "decoding" or j["state"] in ("succeeded", "failed", "cancelled")

    decoding = wait_job(client, job["id"], decoding_or_ended, timeout=60, interval=0.02)
    assert decoding["state"] == "running" and decoding["progress"]["step"] == 2, decoding
    r = client.delete(f"/v1/videos/{job['id']}")
    assert r.status_code == 200 and r.json()["cancel_requested"] and r.json()["state"] == "running"
    done = wait_final(client, job["id"])
    assert done["state"] == "cancelled" and "after the last step; the video was discarded" in done["error"]
    assert client.get(f"/v1/videos/{job['id']}/content").status_code == 409
    assert not (server.data_dir / "results" / f"{job['id']}.mp4").exists()
