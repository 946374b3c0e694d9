"""``wanfast compare``: PSNR / SSIM on synthetic videos of known error, latents mode, the CLI, the plot."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wanfast.tools import compare
from wanfast.video import write_mp4


def smooth_video(frames: int = 5, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 [F, H, W, 3] in [20, 235] (so +-8 noise never clips): moving blurred blobs."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(frames, 3, h // 8, w // 8, generator=g)
    up = torch.nn.functional.interpolate(base, size=(h, w), mode="bicubic", align_corners=False)
    return (20 + 215 * up.clamp(0, 1)).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_psnr_of_known_noise():
    a = smooth_video()
    rng = np.random.default_rng(0)
    noise = rng.choice([-8, 8], size=a.shape)  # every pixel off by exactly 8: MSE = 64
    b = (a.astype(np.int16) + noise).astype(np.uint8)
    res = compare.compare_videos(b, a)
    expected = 10 * math.log10(255**2 / 64)  # 30.07 dB
    assert abs(res["psnr_db"] - expected) < 0.1
    assert all(abs(p - expected) < 0.1 for p in res["psnr_per_frame_db"])
    # noise on one frame only: that frame's PSNR alone drops; overall from the mean MSE (64 / F)
    c = a.copy()
    c[2] = b[2]
    res = compare.compare_videos(c, a)
    assert math.isinf(res["psnr_per_frame_db"][0]) and abs(res["psnr_per_frame_db"][2] - expected) < 0.1
    assert abs(res["psnr_db"] - 10 * math.log10(255**2 / (64 / 5))) < 0.1
    assert res["ssim_per_frame"][0] == pytest.approx(1.0) and res["ssim_per_frame"][2] < 0.99


def test_identical_and_shifted_ssim():
    a = smooth_video()
    res = compare.compare_videos(a, a.copy())
    assert math.isinf(res["psnr_db"]) and res["ssim"] == pytest.approx(1.0, abs=1e-12)
    shifted = np.roll(a, 3, axis=2)
    s = compare.compare_videos(shifted, a)["ssim"]
    assert 0.0 < s < 0.95, s


def test_ssim_of_constant_frames_matches_closed_form():
    # Zero variance and covariance: SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 * 255)^2.
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    b = np.full((1, 16, 16, 3), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    expected = (2 * 100 * 140 + c1) / (100**2 + 140**2 + c1)
    assert compare.ssim_frames(b, a)[0] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="shape"):
        compare.compare_videos(a, np.zeros((2, 16, 16, 3), np.uint8))


def test_latents_mode_and_cli(tmp_path):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(16, 3, 6, 8, generator=g)
    delta = torch.zeros_like(ref)
    delta[:, 1] = 0.05 * torch.randn(16, 6, 8, generator=g)  # only latent frame 1 differs
    save_file({"latents": ref + delta}, str(tmp_path / "a.safetensors"))
    save_file({"latents": ref}, str(tmp_path / "b.safetensors"))
    res = compare.compare_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert res["kind"] == "latents" and res["frames"] == 3
    assert res["rel_err"] == pytest.approx((delta.norm() / ref.norm()).item(), rel=1e-6)
    peak = (ref.max() - ref.min()).item()
    mse1 = delta[:, 1].double().pow(2).mean().item()
    assert res["psnr_per_frame_db"][1] == pytest.approx(10 * math.log10(peak**2 / mse1), abs=1e-6)
    assert math.isinf(res["psnr_per_frame_db"][0])

    pytest.importorskip("matplotlib", reason="--png plots with matplotlib (the bench and test extras)")
    parser = argparse.ArgumentParser()
    compare.register(parser.add_subparsers())
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    args = parser.parse_args(
        ["compare", a, b, "--json", str(tmp_path / "m.json"), "--png", str(tmp_path / "l.png")]
    )
    assert args.func(args) == 0
    assert json.loads((tmp_path / "m.json").read_text())["rel_err"] == pytest.approx(res["rel_err"])
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mp4_files_and_png(tmp_path):
    matplotlib_image = pytest.importorskip("matplotlib.image", reason="the plot needs matplotlib")
    a = smooth_video(frames=4, h=64, w=96)
    noisy = (a.astype(np.int16) + np.random.default_rng(1).integers(-6, 7, a.shape)).clip(0, 255)
    write_mp4(a, tmp_path / "a.mp4", crf=0)
    write_mp4(noisy.astype(np.uint8), tmp_path / "b.mp4", crf=0)
    res = compare.compare_files(tmp_path / "b.mp4", tmp_path / "a.mp4")
    assert res["kind"] == "video" and res["frames"] == 4
    assert 20 < res["psnr_db"] < 60 and 0 < res["ssim"] < 1
    png = compare.plot(res, tmp_path / "plot.png")
    img = matplotlib_image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100
    with pytest.raises(ValueError, match="two videos"):
        compare.compare_files(tmp_path / "a.mp4", tmp_path / "x.safetensors")
