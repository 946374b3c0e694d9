"""``wanfast compare A B``: how far video (or latents) A is from reference B.

- two MP4s: PSNR over RGB uint8 (overall = from the mean MSE of all frames; and per frame), and SSIM on
  luma (BT.601 Y), 11x11 gaussian window of sigma 1.5, the usual constants K1 = 0.01, K2 = 0.03, per frame
  (the mean of the SSIM map over valid window positions) and its mean over frames;
- two latent safetensors (key ``latents``, [B, C, F, H, W] or [C, F, H, W]): relative error
  ||A - B|| / ||B|| and PSNR with B's value range (max - min) as the peak, overall and per latent frame.

``--png`` plots the per-frame curves (matplotlib, Agg backend); ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def psnr(mse: float, peak: float) -> float:
    """10 log10(peak^2 / mse); inf for identical inputs."""
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _frames(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if t.dim() != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected [F, H, W, 3] frames, got {tuple(t.shape)}")
    return t.double()


def video_psnr(a, b) -> tuple[float, list[float]]:
    """uint8-range frames [F, H, W, 3] -> (overall PSNR, per-frame PSNR), peak 255."""
    a, b = _frames(a), _frames(b)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a - b).pow(2).flatten(1).mean(1)  # [F]
    return psnr(mse.mean().item(), 255.0), [psnr(m, 255.0) for m in mse.tolist()]


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    return g / g.sum()  # [size], separable: the 2-D window is its outer product


def ssim_frames(a, b, peak: float = 255.0) -> list[float]:
    """Per-frame SSIM of the luma of two [F, H, W, 3] videos (gaussian window, valid positions only)."""
    a, b = _frames(a), _frames(b)
    if a.shape != b.shape:
        raise ValueError(f"videos differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    x, y = (a @ luma)[:, None], (b @ luma)[:, None]  # [F, 1, H, W]
    g = _gaussian_window()
    if min(x.shape[-2:]) < g.numel():
        raise ValueError(f"frames of {tuple(x.shape[-2:])} are smaller than the {g.numel()}px SSIM window")

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable gaussian, valid: [F, 1, H-10, W-10]
        return F.conv2d(F.conv2d(t, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))

    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return ssim_map.flatten(1).mean(1).tolist()


def compare_videos(a, b) -> dict:
    """Metrics of frames ``a`` against reference frames ``b`` (uint8 range [F, H, W, 3])."""
    overall, per_frame = video_psnr(a, b)
    ssim = ssim_frames(a, b)
    return {"kind": "video", "frames": len(per_frame), "psnr_db": overall, "psnr_per_frame_db": per_frame,
            "ssim": float(np.mean(ssim)), "ssim_per_frame": ssim}  # fmt: skip


def compare_latents(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Latents [..., C, F, H, W] of ``a`` against reference ``b``: relative error and range PSNR."""
    if a.shape != b.shape:
        raise ValueError(f"latents differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.double(), b.double()
    peak = (b.max() - b.min()).item()
    diff = (a - b).pow(2).movedim(-3, 0).flatten(1)  # [F, rest]
    rel = ((a - b).norm() / b.norm()).item() if b.norm() > 0 else math.inf
    return {"kind": "latents", "frames": diff.shape[0], "rel_err": rel, "peak": peak,
            "psnr_db": psnr(diff.mean().item(), peak),
            "psnr_per_frame_db": [psnr(m, peak) for m in diff.mean(1).tolist()]}  # fmt: skip


def load_latents(path: str | os.PathLike) -> torch.Tensor:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    if "latents" not in sd:
        raise ValueError(f"{path} holds no 'latents' tensor (keys: {sorted(sd)[:5]})")
    return sd["latents"]


def compare_files(a: str | os.PathLike, b: str | os.PathLike) -> dict:
    """MP4s or latent safetensors, chosen by the file extension (both must be of the same kind)."""
    kinds = {Path(p).suffix.lower() for p in (a, b)}
    if kinds == {".safetensors"}:
        return compare_latents(load_latents(a), load_latents(b))
    if kinds <= {".mp4", ".mov", ".mkv", ".webm"}:
        from wanfast.video import read_mp4

        return compare_videos(read_mp4(a)[0], read_mp4(b)[0])
    raise ValueError(f"compare needs two videos or two .safetensors latent files, got {a} and {b}")


def plot(result: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Per-frame PSNR (and SSIM for videos) curves to a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = 2 if "ssim_per_frame" in result else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 2.6 * rows), squeeze=False)
    frames = range(result["frames"])
    finite = [v if math.isfinite(v) else float("nan") for v in result["psnr_per_frame_db"]]
    axes[0, 0].plot(frames, finite, marker="o", ms=3)
    axes[0, 0].set_ylabel("PSNR (dB)")
    axes[0, 0].set_title(title or f"{result['kind']}: PSNR {result['psnr_db']:.2f} dB")
    if rows == 2:
        axes[1, 0].plot(frames, result["ssim_per_frame"], marker="o", ms=3, color="tab:orange")
        axes[1, 0].set_ylabel("SSIM (luma)")
    axes[-1, 0].set_xlabel("frame")
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary(result: dict) -> str:
    line = f"{result['kind']}: {result['frames']} frames, PSNR {result['psnr_db']:.2f} dB"
    if "ssim" in result:
        line += f", SSIM {result['ssim']:.4f}"
    if "rel_err" in result:
        line += f", relative error {result['rel_err']:.4g}"
    return line


def compare_main(args: argparse.Namespace) -> int:
    result = compare_files(args.a, args.b)
    print(summary(result))
    if args.png:
        print(f"plot: {plot(result, args.png, f'{Path(args.a).name} vs {Path(args.b).name}')}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"a": str(args.a), "b": str(args.b), **result}, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "compare", help="PSNR / SSIM of video A against reference B (or two latent files)"
    )
    p.add_argument("a", type=Path, help="video (.mp4) or latents (.safetensors) to judge")
    p.add_argument("b", type=Path, help="the reference, of the same kind")
    p.add_argument("--png", type=Path, default=None, help="plot the per-frame curves here")
    p.add_argument("--json", type=Path, default=None, help="write the metrics here")
    p.set_defaults(func=compare_main)
    return p
