"""Video conversion and MP4 I/O through PyAV (FFmpeg's libraries).

``Mp4Writer`` encodes while the caller still produces frames (the VAE decode hands it one latent frame's
worth at a time): H.264 runs in a background thread, whose libx264 and colour conversion calls release
the GIL. ``write_mp4`` is the same writer given every frame at once, so the bytes are the same.

How much of the decode the encode can hide: x264's medium preset looks 40 frames ahead (rc-lookahead,
mb-tree), so it emits frame n only once frame n + 40 has arrived, and until then does little more than
the look-ahead analysis (~5 ms a 480p frame, against ~85 ms to encode one, measured on 2 cores). The
encoding proper starts about halfway through an 81-frame decode, and the last 40 frames are encoded after
it: the time saved is roughly the decode's second half (benchmarks/mp4_stream.py).
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import numpy as np
import torch

STREAM_ENV = "WANFAST_STREAM_MP4"  # "0": write the MP4 after the decode instead of during it
# libx264's threading: "frame" (x264's frame threads, several frames in flight; measured faster on the H200
# host's 16 cores: 1280x720x81 written in 3.41 vs 4.41 s) or "slice" (PyAV's default: each frame cut into
# slices, one per thread). Either way the bytes depend on the thread count.
THREADS_ENV = "WANFAST_MP4_THREADS"


def stream_mp4_enabled() -> bool:
    """Whether the MP4 is encoded while the VAE decodes (default) or after it (``WANFAST_STREAM_MP4=0``,
    and ``wanfast generate --no-stream-mp4``): the one place the switch is read."""
    return os.environ.get(STREAM_ENV, "1") != "0"


def mp4_thread_type() -> str:
    """``WANFAST_MP4_THREADS``: "frame" (default) or "slice", libx264's threading (``_H264``)."""
    kind = os.environ.get(THREADS_ENV, "frame").lower()
    if kind not in ("slice", "frame"):
        raise ValueError(f"{THREADS_ENV} must be slice or frame, got {kind!r}")
    return kind


def to_uint8_frames(video: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] as the official saver (``save_video``): clamp, map to
    [0, 1] as ``make_grid(normalize=True, value_range=(-1, 1))`` does ((x + 1) / 2), then
    ``(x * 255).type(torch.uint8)``, which truncates (it does not round). ``out``: a CPU uint8
    [F, H, W, 3] tensor (e.g. a slice of the whole video's) written and returned instead of a new one."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a [3, F, H, W] video, got {tuple(video.shape)}")
    x = ((video.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0)
    if out is None:
        return x.contiguous().cpu()
    return out.copy_(x)  # a device source is made contiguous there, then copied once


def _as_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected uint8 [F, H, W, 3] frames, got {arr.dtype} {arr.shape}")
    return arr


class _H264:
    """One open MP4 file with its libx264 stream: the encoder settings of every MP4 written here."""

    def __init__(self, path: Path, width: int, height: int, fps: int, crf: int) -> None:
        import av  # FFmpeg bindings: imported only where a file is written or read

        self.av = av
        self.container = av.open(str(path), mode="w")  # the format follows the file name's suffix
        try:
            self.stream = self.container.add_stream("libx264", rate=fps)
            self.stream.width, self.stream.height = width, height
            self.stream.pix_fmt = "yuv420p"  # playable everywhere
            self.stream.options = {"crf": str(crf)}
            self.stream.codec_context.thread_type = mp4_thread_type().upper()
        except BaseException:
            self.container.close()
            raise

    def encode(self, frames: np.ndarray) -> None:
        for frame in frames:  # [H, W, 3]; RGB -> YUV 4:2:0 happens inside encode
            for packet in self.stream.encode(self.av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self.container.mux(packet)

    def finish(self) -> None:
        for packet in self.stream.encode():  # flush the frames x264 still holds (lookahead, B-frames)
            self.container.mux(packet)
        self.container.close()


_END = object()  # the queue's last item


class Mp4Writer:
    """An H.264 MP4 (yuv420p, crf ``crf``) written while frames arrive: ``add`` queues uint8 [f, H, W, 3]
    frames (a tensor or an array; kept by reference, so not to be changed after) and returns at once; a
    background thread encodes them in order. ``close`` waits for the rest and returns the path.

    The file is written under a hidden partial name beside ``path`` and renamed at ``close``, so ``path``
    only ever holds a whole video. An error in the encoder thread is raised by the next ``add`` or by
    ``close``; ``abort`` (and leaving a ``with`` block by an exception, or a failed ``close``) stops the
    thread and deletes the partial file.
    """

    def __init__(
        self, path: str | os.PathLike, width: int, height: int, fps: int = 16, crf: int = 18
    ) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"H.264 with yuv420p needs even sizes, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height, self.frames = width, height, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # the same suffix: the container format is chosen by the file name, as for ``path`` itself
        self._partial = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        self._encoder = _H264(self._partial, width, height, fps, crf)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # unbounded: add never waits on the encoder
        self._error: BaseException | None = None
        self._stopping = False
        self._state = "open"  # -> "closed" or "aborted"
        self._thread = threading.Thread(target=self._work, name="mp4-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            while (item := self._queue.get()) is not _END:
                if not self._stopping:
                    self._encoder.encode(item)
            if not self._stopping:
                self._encoder.finish()
        except BaseException as e:  # handed to the caller's thread by add / close
            self._error = e

    def add(self, frames: torch.Tensor | np.ndarray) -> None:
        """Queue uint8 [f, H, W, 3] frames (any f >= 0)."""
        if self._error is not None:
            raise self._error
        if self._state != "open":
            raise RuntimeError(f"{self.path}: the writer is {self._state}")
        arr = _as_frames(frames)
        if arr.shape[1:3] != (self.height, self.width):
            raise ValueError(f"expected {self.width}x{self.height} frames, got {arr.shape[2]}x{arr.shape[1]}")
        self._queue.put(np.ascontiguousarray(arr))
        self.frames += arr.shape[0]

    def close(self) -> Path:
        """Encode what is queued, finish the file and move it to ``path``; returns ``path``. Raises the
        encoder's error (the partial file deleted then)."""
        if self._state == "closed":
            return self.path
        if self._state == "aborted":
            raise RuntimeError(f"{self.path}: the writer was aborted")
        self._queue.put(_END)
        self._thread.join()
        if self._error is not None:
            self.abort()
            raise self._error
        try:
            os.replace(self._partial, self.path)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Stop encoding (queued frames are dropped) and delete the partial file; ``path`` is untouched.
        A no-op once closed or aborted."""
        if self._state != "open":
            return
        self._state, self._stopping = "aborted", True
        self._queue.put(_END)
        self._thread.join()
        try:
            self._encoder.container.close()  # after a finish or a failure: may already be closed
        except Exception:
            pass
        self._partial.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_mp4(
    frames: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: int = 16, crf: int = 18
) -> Path:
    """Write uint8 [F, H, W, 3] frames as H.264 (yuv420p, playable everywhere): an ``Mp4Writer`` given
    every frame at once."""
    arr = _as_frames(frames)
    with Mp4Writer(path, arr.shape[2], arr.shape[1], fps=fps, crf=crf) as writer:
        writer.add(arr)
    return writer.path


def finish_mp4(
    writer: Mp4Writer | None, frames: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: int = 16
) -> Path:
    """The MP4 of a finished run: ``writer.close()`` when the run fed the writer all of ``frames``
    (uint8 [F, H, W, 3]), else ``write_mp4`` now (no writer, or a pipeline that never called its sink;
    the writer is then aborted)."""
    if writer is not None and writer.frames == len(frames):
        return writer.close()
    if writer is not None:
        writer.abort()
    return write_mp4(frames, path, fps=fps)


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
