"""Video conversion and MP4 I/O through PyAV (FFmpeg's libraries)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] as the official saver (``save_video``): clamp, map to
    [0, 1] as ``make_grid(normalize=True, value_range=(-1, 1))`` does ((x + 1) / 2), then
    ``(x * 255).type(torch.uint8)``, which truncates (it does not round)."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a [3, F, H, W] video, got {tuple(video.shape)}")
    x = ((video.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu()


def write_mp4(
    frames: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: int = 16, crf: int = 18
) -> Path:
    """Write uint8 [F, H, W, 3] frames as H.264 (yuv420p, playable everywhere)."""
    arr = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 [F, H, W, 3] frames, got {arr.dtype} {arr.shape}")
    if arr.shape[1] % 2 or arr.shape[2] % 2:
        raise ValueError(f"H.264 with yuv420p needs even sizes, got {arr.shape[2]}x{arr.shape[1]}")
    import av  # FFmpeg bindings: imported only where a file is written or read

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """uint8 [F, H, W, 3] frames and the stream's frame rate."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"no video frames in {path}")
    return np.stack(frames), fps
