"""The MP4 written during the VAE decode: ``video.Mp4Writer`` against ``write_mp4`` (same bytes: x264 is
deterministic for the same frames and settings), its errors and abort, the decoders' ``on_frames``
callback (the returned video unchanged, bit for bit), the pipeline's ``frames_sink`` and
``wanfast generate`` with and without --no-stream-mp4. Comparisons are exact (``torch.equal`` / bytes):
the streamed paths run the same operations on the same values, only split by time."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from helpers import randomize

import wanfast.pipeline
import wanfast.video
from wanfast.accel.vae import FastWan22VAE, FastWanVAE, optimize_vae
from wanfast.cli import main
from wanfast.config import EngineSettings, VAE22Config
from wanfast.loading import vae22_keys
from wanfast.models.vae import WanVAE
from wanfast.models.vae22 import Wan22VAE
from wanfast.specs import SPECS
from wanfast.video import Mp4Writer, finish_mp4, read_mp4, to_uint8_frames, write_mp4

av = pytest.importorskip("av")
CPU = EngineSettings(device="cpu")


def noise(frames: int = 13, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """The worst case for H.264 (random-weight videos look like this): uint8 [F, H, W, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (frames, h, w, 3), dtype=np.uint8)


def smooth(frames: int = 13, h: int = 48, w: int = 64) -> np.ndarray:
    t, y, x = np.meshgrid(np.arange(frames), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([(x * 4 + t * 8) % 256, y * 5, (x + y + t * 3) * 2 % 256], -1).astype(np.uint8)


def streamed(frames, path, chunks: list[int], fps: int = 16):
    with Mp4Writer(path, frames.shape[2], frames.shape[1], fps=fps) as writer:
        t = 0
        for n in chunks:
            writer.add(frames[t : t + n])
            t += n
        assert t == len(frames)
    return writer.path


@pytest.mark.parametrize("kind", ["noise", "smooth"])
@pytest.mark.parametrize("chunks", [[1, 4, 4, 4], [1] * 13, [5, 3, 2, 3], [13], [0, 1, 12, 0]])
def test_writer_bytes_equal_write_mp4(tmp_path, kind, chunks):
    frames = noise() if kind == "noise" else smooth()
    want = write_mp4(frames, tmp_path / "a.mp4", fps=16).read_bytes()
    got = streamed(frames, tmp_path / "b.mp4", chunks).read_bytes()
    assert got == want and len(got) > 1000
    back, fps = read_mp4(tmp_path / "b.mp4")
    assert back.shape == frames.shape and fps == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]  # no partial file left


def test_writer_takes_tensors_and_a_torch_chunk_equals_numpy(tmp_path):
    frames = noise(5, seed=1)
    want = write_mp4(frames, tmp_path / "a.mp4", fps=24).read_bytes()
    t = torch.from_numpy(frames)
    assert streamed(t, tmp_path / "b.mp4", [1, 4], fps=24).read_bytes() == want
    assert write_mp4(t, tmp_path / "c.mp4", fps=24).read_bytes() == want


def test_bad_frames_raise_in_the_caller(tmp_path):
    with pytest.raises(ValueError, match="even sizes"):
        Mp4Writer(tmp_path / "x.mp4", 63, 48)
    with pytest.raises(ValueError, match="even sizes"):
        write_mp4(noise(2, 48, 63), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="expected uint8"):
        write_mp4(noise(2).astype(np.float32), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="expected 64x48 frames, got 32x48"):
        with Mp4Writer(tmp_path / "x.mp4", 64, 48) as w:
            w.add(noise(1))
            w.add(noise(1, 48, 32))
    assert list(tmp_path.iterdir()) == []  # the with block's exception aborted: no file, no partial one


def test_encoder_error_surfaces_and_the_partial_file_goes(tmp_path, monkeypatch):
    calls = []
    real = wanfast.video._H264.encode

    def encode(self, frames):
        calls.append(len(frames))
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        real(self, frames)

    monkeypatch.setattr(wanfast.video._H264, "encode", encode)
    out = tmp_path / "v.mp4"
    out.write_bytes(b"an older video")
    w = Mp4Writer(out, 64, 48)
    w.add(noise(1))
    w.add(noise(4))
    deadline = time.monotonic() + 30
    with pytest.raises(OSError, match="disk full"):  # raised by a later add once the thread has failed
        while time.monotonic() < deadline:
            w.add(noise(1))
            time.sleep(0.01)
    with pytest.raises(OSError, match="disk full"):  # and by close
        w.close()
    assert out.read_bytes() == b"an older video"  # untouched: the writer only renames a finished file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_abort_keeps_the_old_file_and_finish_falls_back(tmp_path):
    frames = noise(5, seed=2)
    out = tmp_path / "v.mp4"
    out.write_bytes(b"old")
    with pytest.raises(KeyError):
        with Mp4Writer(out, 64, 48) as w:
            w.add(frames[:1])
            raise KeyError("the run failed")
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]
    with pytest.raises(RuntimeError, match="aborted"):
        w.add(frames)
    # a writer the run never fed (a pipeline without the sink): aborted, the frames written after
    want = write_mp4(frames, tmp_path / "ref.mp4").read_bytes()
    finish_mp4(Mp4Writer(out, 64, 48), frames, out)
    assert out.read_bytes() == want
    fed = Mp4Writer(tmp_path / "fed.mp4", 64, 48)
    fed.add(frames)
    assert finish_mp4(fed, frames, tmp_path / "fed.mp4").read_bytes() == want
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fed.mp4", "ref.mp4", "v.mp4"]


# --- decoders: on_frames -----------------------------------------------------------------------------


def _wan21(dtype=torch.float32) -> WanVAE:
    torch.manual_seed(0)
    return randomize(WanVAE(SPECS["tiny"].vae)).to(dtype).eval()


def _wan22() -> Wan22VAE:
    cfg = VAE22Config(dim=8, dec_dim=16, num_res_blocks=1)
    vae = Wan22VAE(cfg)
    vae.load_state_dict(vae22_keys.wan22_vae_state_dict(cfg, 0), strict=True)
    return vae.eval()


VAES = {
    "wan21": lambda: _wan21(),
    "wan21_bf16": lambda: _wan21(torch.bfloat16),
    "wan21_fast": lambda: optimize_vae(_wan21(), CPU),
    "wan21_fast_bf16": lambda: optimize_vae(_wan21(torch.bfloat16), CPU),
    "wan21_fast_no_prealloc": lambda: optimize_vae(_wan21(), CPU, prealloc_output=False),
    "wan22": _wan22,
    "wan22_fast": lambda: optimize_vae(_wan22(), CPU),
}


@torch.inference_mode()
@pytest.mark.parametrize("name", list(VAES))
def test_decode_with_callback_equals_without(name):
    vae = VAES[name]()
    assert isinstance(vae, (FastWan22VAE if "22" in name else FastWanVAE)) == ("fast" in name)
    z = 3 * torch.randn(1, vae.cfg.z_dim, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    want = vae.decode(z)
    chunks = []
    got = vae.decode(z, on_frames=lambda c: chunks.append(c.clone()))
    assert torch.equal(got, want)
    assert [c.shape[2] for c in chunks] == [1, 4, 4]  # latent frame 0 -> 1 frame, later ones -> 4 each
    assert all(c.dtype == torch.float32 and c.shape[:2] == (1, 3) for c in chunks)
    assert torch.equal(torch.cat(chunks, 2), want)  # the clamped values the returned video holds
    assert (want.abs() == 1).any() and (want.abs() < 1).float().mean() > 0.1  # the clamp took part


def test_parallel_runtime_decode_hands_over_the_whole_video(monkeypatch):
    from wanfast.parallel import cfg

    video = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    monkeypatch.setattr(cfg, "parallel_decode", lambda vae, z, group, overlap: video)
    runtime = cfg.ParallelRuntime(type("Mesh", (), {"world_group": None})(), torch.float32)
    seen = []
    assert runtime.decode(None, torch.zeros(1), on_frames=seen.append) is video
    assert len(seen) == 1 and seen[0] is video  # tiles split every frame: one call, after the decode
    assert runtime.decode(None, torch.zeros(1)) is video


# --- pipeline and CLI ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_official):
    from wanfast import load_pipeline

    return load_pipeline(tiny_official, "cpu", torch.float32, torch.float32)


def test_pipeline_sink_gets_the_frames_in_order(pipe):
    params = pipe.params("a fox", size=(64, 48), frames=9, steps=2, seed=4)
    plain = pipe.run(params)
    chunks = []
    res = pipe.run(params, frames_sink=chunks.append)
    assert [c.shape for c in chunks] == [(1, 48, 64, 3), (4, 48, 64, 3), (4, 48, 64, 3)]
    assert all(c.dtype == torch.uint8 and c.device.type == "cpu" for c in chunks)
    assert torch.equal(torch.cat(chunks), res.frames) and torch.equal(res.frames, plain.frames)
    assert torch.equal(res.latents, plain.latents) and res.frames.is_contiguous()


def test_pipeline_sink_conversion_is_to_uint8_frames(pipe, monkeypatch):
    """The sink path converts each chunk as ``to_uint8_frames`` converts the whole decode output."""
    params = pipe.params("a fox", size=(64, 48), frames=5, steps=1, seed=5)
    decoded = []
    real = pipe.vae.decode

    def decode(z, on_frames=None):
        out = real(z, on_frames=on_frames)
        decoded.append(out)
        return out

    monkeypatch.setattr(pipe.vae, "decode", decode)
    res = pipe.run(params, frames_sink=lambda c: None)
    assert torch.equal(res.frames, to_uint8_frames(decoded[0][0]))


def _generate(tmp_path, name: str, *flags: str) -> bytes:
    out = tmp_path / name
    argv = ["generate", "--model", "tiny", "--prompt", "a cat", "--output", str(out), "--no-progress"]
    assert main([*argv, "--seed", "3", *flags]) == 0
    return out.read_bytes()


def test_generate_streamed_and_not_write_the_same_mp4(tmp_path, monkeypatch):
    adds = []
    real = Mp4Writer.add
    monkeypatch.setattr(Mp4Writer, "add", lambda self, f: (adds.append(len(f)), real(self, f))[1])
    streamed_mp4 = _generate(tmp_path, "s.mp4")
    assert adds == [1, 4, 4]  # the tiny preset's 9 frames, handed over during the decode
    adds.clear()
    after = _generate(tmp_path, "a.mp4", "--no-stream-mp4")
    assert adds == [9]  # write_mp4 after the run: one add of every frame
    assert streamed_mp4 == after and len(after) > 1000
    adds.clear()
    monkeypatch.setenv("WANFAST_STREAM_MP4", "0")
    assert _generate(tmp_path, "e.mp4") == after and adds == [9]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "e.mp4", "s.mp4"]


def test_a_failed_generate_leaves_the_output_as_it_was(tmp_path, monkeypatch, capsys):
    def oom(self, params, progress=None, frames_sink=None, **kw):
        frames_sink(torch.zeros(1, params.height, params.width, 3, dtype=torch.uint8))  # the decode began
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(wanfast.pipeline.WanPipeline, "run", oom)
    out = tmp_path / "o.mp4"
    out.write_bytes(b"old")
    assert main(["generate", "--model", "tiny", "--prompt", "x", "--output", str(out), "--no-progress"]) == 2
    assert "out of GPU memory" in capsys.readouterr().err
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4"]


def test_two_writers_at_once(tmp_path):
    """Writers are independent (a batch line's writer may still finish while the next opens)."""
    a, b = noise(9, seed=3), smooth(9)
    wa, wb = Mp4Writer(tmp_path / "a.mp4", 64, 48), Mp4Writer(tmp_path / "b.mp4", 64, 48)
    for t0, t1 in [(0, 1), (1, 5), (5, 9)]:
        wa.add(a[t0:t1])
        wb.add(b[t0:t1])
    assert wb.close().read_bytes() == write_mp4(b, tmp_path / "rb.mp4").read_bytes()
    assert wa.close().read_bytes() == write_mp4(a, tmp_path / "ra.mp4").read_bytes()


def test_server_worker_streams_the_same_mp4(tmp_path, pipe, monkeypatch):
    from wanfast.server.jobs import JobStore
    from wanfast.server.worker import run_job

    adds = []
    real = Mp4Writer.add
    monkeypatch.setattr(Mp4Writer, "add", lambda self, f: (adds.append(len(f)), real(self, f))[1])
    store = JobStore(tmp_path / "jobs.db")
    store.reset_workers(["w0"])
    store.register_worker("w0", "me")
    request = {"prompt": "a cat", "steps": 2, "frames": 5, "seed": 1}
    results, got = tmp_path / "results", {}
    results.mkdir()
    for stream in ("1", "0"):
        monkeypatch.setenv("WANFAST_STREAM_MP4", stream)
        adds.clear()
        job, _ = store.submit(request, max_queued=4)
        assert run_job(pipe, store, store.claim("me"), "me", results) == "succeeded"
        assert "write_mp4" in store.get(job.id).timings
        assert adds == ([1, 4] if stream == "1" else [5])  # during the decode, or all after it
        got[stream] = (results / f"{job.id}.mp4").read_bytes()
    ref = write_mp4(pipe.run(pipe.params(**request)).frames, tmp_path / "ref.mp4").read_bytes()
    assert got["1"] == got["0"] == ref
    assert sorted(p.name for p in results.iterdir()) == sorted(f"{j.id}.mp4" for j in store.list()[0])


@pytest.mark.parametrize("kind", ["frame", "slice"])
def test_x264_threads_switch(tmp_path, monkeypatch, kind):
    """WANFAST_MP4_THREADS=frame (the default: x264's frame threads) or slice (PyAV's default): streamed and
    whole writes give the same bytes, the file holds every frame, and the smooth video comes back close
    (crf 18: PSNR well above 30 dB); an unknown value is refused and leaves no file."""
    monkeypatch.setenv("WANFAST_MP4_THREADS", kind)
    frames = smooth()
    want = write_mp4(frames, tmp_path / "a.mp4", fps=16).read_bytes()
    assert streamed(frames, tmp_path / "b.mp4", [1, 4, 4, 4]).read_bytes() == want
    back, _ = read_mp4(tmp_path / "b.mp4")
    mse = np.mean((back.astype(np.float64) - frames) ** 2)
    assert back.shape == frames.shape and 10 * np.log10(255**2 / max(mse, 1e-12)) > 30
    monkeypatch.setenv("WANFAST_MP4_THREADS", "fast")
    with pytest.raises(ValueError, match="WANFAST_MP4_THREADS"):
        write_mp4(frames, tmp_path / "c.mp4")
    assert not (tmp_path / "c.mp4").exists()
