"""The server's LoRA library: listing, requests checked at the door (4xx before a job is stored), a worker
switching LoRA sets between jobs (each job's video equal to a fresh build with its set), the store's grouping
of jobs by LoRA set with bounded overtaking, and a broken library refused at start. Tiny model, CPU."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import save_file

from wanfast.config import ConfigError
from wanfast.server.jobs import JobStore
from wanfast.server.lora_library import LoraLibrary, set_key
from wanfast.server.testing import ServerProcess, wait_final, wait_job
from wanfast.specs import SPECS
from wanfast.tools.lora_testing import random_lora_tensors, write_random_lora

SPEC = SPECS["tiny"]
A = [{"name": "a", "high_noise": 3.0, "low_noise": 1.5}]
B = [{"name": "b", "high_noise": 1.0, "low_noise": 1.0}]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    d = tmp_path_factory.mktemp("library")
    write_random_lora(d / "a.safetensors", SPEC.dit, rank=4, seed=1, extras=True)
    write_random_lora(d / "b.safetensors", SPEC.dit, rank=8, seed=2)
    return d


# -- the library and the door's rules, no processes ---------------------------------------------------------


def test_library_lists_and_fills_strengths_as_the_cli(library):
    lib = LoraLibrary.open(library, SPEC)
    info = {x["name"]: x for x in lib.listing()}
    assert set(info) == {"a", "b"} and info["b"]["rank"] == 8 and info["a"]["full_deltas"] is True
    assert (
        info["a"]["size_bytes"] == (library / "a.safetensors").stat().st_size
        and "tiny" in info["a"]["models"]
    )
    got = lib.canonical([{"name": "a"}, {"name": "b", "high_noise": 3.0}], True, 4)
    assert got == [
        {"name": "a", "high_noise": 1.0, "low_noise": 1.0},
        {"name": "b", "high_noise": 3.0, "low_noise": 3.0},
    ]
    assert (
        lib.canonical([{"name": "a", "low_noise": 2.0}], True, 4)[0]["high_noise"] == 1.0
    )  # HIGH defaults to 1
    for bad, msg in [
        ([{"name": "zzz"}], "no LoRA named 'zzz'"),
        ([{"name": "a"}, {"name": "a", "high_noise": 2.0}], "named twice"),
        ([{"name": "a", "high_noise": 10.5}], "finite strength"),
        ([{"name": "a", "low_noise": math.inf}], "finite strength"),
        ([{"name": "a"}, {"name": "b"}], "at most 1"),
    ]:
        with pytest.raises(ValueError, match=msg):
            lib.canonical(bad, True, 1 if "at most" in msg else 4)
    with pytest.raises(ValueError, match="one DiT"):
        lib.canonical([{"name": "a", "low_noise": 1.0}], False, 4)
    kept = LoraLibrary.open(library, SPEC, keep=True)
    assert [(f.path, hi, lo) for f, hi, lo in kept.stack({"loras": got})] == [
        (str(library / "a.safetensors"), 1.0, 1.0),
        (str(library / "b.safetensors"), 3.0, 3.0),
    ]
    with pytest.raises(ConfigError, match="'gone' is no longer in the server's library"):
        kept.stack(
            {"loras": [{"name": "gone", "high_noise": 1.0, "low_noise": 1.0}]}
        )  # queued before a restart


def test_a_broken_library_is_refused_naming_the_file(tmp_path):
    save_file({"unet.down.weight": torch.zeros(2, 2)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(ConfigError, match="junk.safetensors.*unknown LoRA key"):
        LoraLibrary.open(tmp_path, SPEC)
    (tmp_path / "junk.safetensors").unlink()
    save_file(random_lora_tensors(SPECS["ti2v-5B"].dit, rank=1, seed=0), str(tmp_path / "big.safetensors"))
    with pytest.raises(ConfigError, match="big.safetensors.*a LoRA for ti2v-5B"):
        LoraLibrary.open(tmp_path, SPEC)
    (tmp_path / "big.safetensors").unlink()
    with pytest.raises(ConfigError, match="no .safetensors"):
        LoraLibrary.open(tmp_path, SPEC)
    write_random_lora(tmp_path / "bad name.safetensors", SPEC.dit, rank=2, seed=0)
    with pytest.raises(ConfigError, match="rename it"):
        LoraLibrary.open(tmp_path, SPEC)


# -- grouping in the store -----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "jobs.db")
    s.reset_workers(["w0"])
    s.register_worker("w0", "tok")
    return s


def _queue(store: JobStore, sets: list[list]) -> list[str]:
    ids = []
    for i, loras in enumerate(sets):
        request = {"prompt": f"job {i}", **({"loras": loras} if loras else {})}
        ids.append(store.submit(request, max_queued=100)[0].id)
    return ids


def _order(store: JobStore, prefer: str | None, n: int, max_overtaken: int = 4) -> list[str]:
    return [store.claim("tok", prefer, max_overtaken).id for _ in range(n)]


def test_claim_prefers_the_set_the_worker_holds(store):
    ids = _queue(store, [[], A, [], A, B])
    assert _order(store, set_key({"loras": A}), 5) == [ids[1], ids[3], ids[0], ids[2], ids[4]]
    assert store.claim("tok", set_key({"loras": A})) is None  # empty queue


def test_without_a_preference_or_with_no_overtaking_the_order_is_submission(store):
    ids = _queue(store, [[], A, B, A])
    assert _order(store, None, 2) == ids[:2]
    assert _order(store, set_key({"loras": A}), 2, max_overtaken=0) == ids[2:]


def test_no_job_is_overtaken_by_more_than_n_newer_ones(store):
    """The oldest job (no LoRA) lets two newer A jobs go first, then runs, though more A jobs wait."""
    ids = _queue(store, [[], A, A, A, A])
    assert _order(store, set_key({"loras": A}), 5, max_overtaken=2) == [
        ids[1],
        ids[2],
        ids[0],
        ids[3],
        ids[4],
    ]
    assert store.claim("nobody", set_key({"loras": A})) is None  # fencing holds with a preference too


# -- a real server with a library ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, library):
    args = ("--lora-dir", str(library), "--max-loras", "2", "--max-steps", "1000")
    with ServerProcess(tmp_path_factory.mktemp("srv"), *args) as srv:
        yield srv


def test_loras_endpoint_lists_the_library(server):
    with server.client() as c:
        data = c.get("/v1/loras").raise_for_status().json()["data"]
    assert (
        [x["name"] for x in data] == ["a", "b"]
        and data[1]["rank"] == 8
        and data[0]["file"] == "a.safetensors"
    )


def test_bad_loras_are_refused_at_the_door_and_store_nothing(server):
    bad = [
        [{"name": "nope"}],
        [{"name": "a"}, {"name": "a"}],
        [{"name": "a"}, {"name": "b"}, {"name": "a", "high_noise": 2}],  # 3 > --max-loras 2
        [{"name": "a", "high_noise": 1e6}],
        [{"name": "a", "high_noise": "2"}],  # strict: a number, not text
        [{"name": "a", "weight": 1.0}],  # unknown field
    ]
    with server.client() as c:
        before = c.get("/v1/videos").json()["total"]
        for loras in bad:
            r = c.post("/v1/videos", json={"prompt": "x", "loras": loras})
            assert r.status_code == 422, (loras, r.text)
        raw = b'{"prompt": "x", "loras": [{"name": "a", "high_noise": NaN}]}'  # not JSON, as Python writes it
        r = c.post("/v1/videos", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, r.text
        assert c.get("/v1/videos").json()["total"] == before


def _reference_frames(tmp_path, loras: list[dict], library, body: dict, procs: int = 1, **settings):
    """The video of a fresh in-process build of the tiny model with ``loras`` merged by the builder, at
    the thread count of a worker process of a pool of ``procs`` (same float operations in the same order)."""
    from wanfast.builder import build_pipeline
    from wanfast.config import EngineSettings, LoraSpec
    from wanfast.video import read_mp4, write_mp4

    stack = tuple(
        LoraSpec(str(library / f"{x['name']}.safetensors"), x["high_noise"], x["low_noise"]) for x in loras
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, ((os.cpu_count() or 2) - 1) // procs))  # the pool's share per process
    try:
        pipe = build_pipeline("tiny", EngineSettings(device="cpu", loras=stack, **settings))
        result = pipe.run(
            pipe.params(body["prompt"], seed=body["seed"], frames=body["frames"], steps=body["steps"])
        )
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / f"ref-{len(list(tmp_path.iterdir()))}.mp4"
    write_mp4(result.frames, out, fps=16)
    return read_mp4(out)[0]


def test_a_worker_switches_sets_and_each_job_equals_a_fresh_build(server, library, tmp_path):
    """A -> B+A -> none -> A in the one worker: each video equal (every pixel) to a fresh build's."""
    from wanfast.video import read_mp4

    sets = [A, [B[0], {"name": "a", "high_noise": 2.0, "low_noise": 0.5}], [], A]
    videos = []
    with server.client() as c:
        for i, loras in enumerate(sets):
            body = {"prompt": "a fox", "seed": 5, "frames": 5, "steps": 2}
            r = c.post("/v1/videos", json={**body, **({"loras": loras} if loras else {})})
            assert r.status_code == 202, r.text
            done = wait_final(c, r.json()["id"], timeout=120)
            assert done["state"] == "succeeded", done
            assert done["request"].get("loras", []) == loras  # the stored request records the set
            assert done["timings"]["lora_switch"] >= 0
            (tmp_path / f"got{i}.mp4").write_bytes(c.get(done["content_url"]).content)
            got = read_mp4(tmp_path / f"got{i}.mp4")[0]
            want = _reference_frames(tmp_path, loras, library, body)
            assert got.shape == want.shape and (got == want).all(), (i, loras)
            videos.append(got)
    assert (videos[0] != videos[2]).any() and (videos[0] != videos[1]).any()  # the LoRAs show in the pixels
    assert (videos[3] == videos[0]).all()  # A again after none: the bases came back exactly


def test_queued_jobs_with_the_held_set_go_first(server):
    """While a long A job runs, a no-LoRA job then an A job queue: the A job (no switch) starts first."""
    with server.client() as c:
        long = c.post(
            "/v1/videos", json={"prompt": "x", "size": "32x32", "frames": 1, "steps": 150, "loras": A}
        )
        wait_job(c, long.json()["id"], lambda j: j["state"] == "running", 60)
        plain = c.post("/v1/videos", json={"prompt": "y", "size": "32x32", "frames": 1, "steps": 2}).json()
        same = c.post(
            "/v1/videos", json={"prompt": "z", "size": "32x32", "frames": 1, "steps": 2, "loras": A}
        ).json()
        jobs = [wait_final(c, j["id"], timeout=120) for j in (plain, same)]
    assert all(j["state"] == "succeeded" for j in jobs), jobs
    assert jobs[1]["started_at"] < jobs[0]["started_at"]


def test_serve_refuses_a_broken_library_and_static_loras_at_start(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    save_file(
        {"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 7)},
        str(lib / "x.safetensors"),
    )
    code, out = ServerProcess(tmp_path / "d1", "--lora-dir", str(lib)).run_to_exit()
    assert code != 0 and "x.safetensors" in out and "lacks its B" in out, out[-2000:]
    (lib / "x.safetensors").unlink()
    write_random_lora(lib / "ok.safetensors", SPEC.dit, rank=2, seed=0)
    static = ("--lora-dir", str(lib), "--lora", str(lib / "ok.safetensors"))
    code, out = ServerProcess(tmp_path / "d2", *static).run_to_exit()
    assert code != 0 and "cannot be combined with --lora" in out, out[-2000:]


def test_a_two_process_worker_switches_on_both_ranks(tmp_path, library):
    """CFG-parallel over two processes: rank 1 runs the unconditional pass, so it must switch too; the
    videos equal the one-process fresh builds' (the same forwards, one per process)."""
    from wanfast.video import read_mp4

    args = ("--lora-dir", str(library), "--workers", "1", "--gpus-per-worker", "2")
    body = {"prompt": "a fox", "seed": 5, "frames": 5, "steps": 2}
    with ServerProcess(tmp_path / "split", *args) as srv, srv.client() as c:
        for i, loras in enumerate([A, [], B]):
            r = c.post("/v1/videos", json={**body, **({"loras": loras} if loras else {})})
            done = wait_final(c, r.json()["id"], timeout=120)
            assert done["state"] == "succeeded", done
            (tmp_path / f"got{i}.mp4").write_bytes(c.get(done["content_url"]).content)
            got = read_mp4(tmp_path / f"got{i}.mp4")[0]
            want = _reference_frames(tmp_path, loras, library, body, procs=2)
            assert (got == want).all(), (i, loras)


def test_an_fp8_worker_requantises_each_set_as_a_fresh_fp8_build(tmp_path, library):
    """--quant fp8: the worker re-quantises from the (tiny) checkpoint's values; videos equal the fresh
    FP8 builds' with each set."""
    from wanfast.video import read_mp4

    body = {"prompt": "a fox", "seed": 5, "frames": 5, "steps": 2}
    with (
        ServerProcess(tmp_path / "fp8", "--lora-dir", str(library), "--quant", "fp8") as srv,
        srv.client() as c,
    ):
        for i, loras in enumerate([A, []]):
            r = c.post("/v1/videos", json={**body, **({"loras": loras} if loras else {})})
            done = wait_final(c, r.json()["id"], timeout=120)
            assert done["state"] == "succeeded", done
            (tmp_path / f"got{i}.mp4").write_bytes(c.get(done["content_url"]).content)
            got = read_mp4(tmp_path / f"got{i}.mp4")[0]
            want = _reference_frames(tmp_path, loras, library, body, quant="fp8")
            assert (got == want).all(), (i, loras)


def test_a_worker_without_a_library_fails_a_job_naming_loras():
    """An API process with a library in front of a `wanfast worker` started without one: the job fails with
    the reason, it never runs without its LoRAs (the same check on every rank: ``_params``)."""
    from types import SimpleNamespace

    from wanfast.server.jobdb import Job
    from wanfast.server.worker import _params

    fields = dict.fromkeys(Job.__dataclass_fields__)
    job = Job(**{**fields, "request": {"prompt": "a cat", "loras": [{"name": "x", "high_noise": 1.0}]}})
    with pytest.raises(ConfigError, match="no LoRA library .*--lora-dir"):
        _params(SimpleNamespace(lora_switcher=None), job)


def test_wanfast_worker_takes_the_pool_flags_of_serve():
    """`wanfast worker` runs the same pool as `wanfast serve`: the LoRA library and warm sizes too."""
    from wanfast.cli import build_parser

    flags = ("--lora-dir", "L", "--lora-max-overtaken", "2", "--warm-sizes", "64x48x5", "--workers", "2")
    for command in ("serve", "worker"):
        args = build_parser().parse_args([command, "--model", "tiny", *flags])
        assert (str(args.lora_dir), args.lora_max_overtaken, args.warm_sizes, args.workers) == (
            "L", 2, "64x48x5", 2)  # fmt: skip
