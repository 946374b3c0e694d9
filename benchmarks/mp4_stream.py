"""The MP4 written during the VAE decode (``video.Mp4Writer``) against after it (``write_mp4``), without a
model: the decode is simulated chunk by chunk (latent frame 0 -> 1 frame, later ones -> 4), either as a
sleep (a GPU decode leaves the host's cores to the encoder) or as host matmuls (a CPU decode competes with
it). Frames are uniform noise, the worst case for H.264 and what random-weight videos look like.

    python3 benchmarks/mp4_stream.py --size 832x480 --frames 81 --decode-s 0.92 --out mp4_stream.json

Per decode time: sequential = decode + write_mp4; streamed = the decode feeding the writer, then close;
``tail_s`` = close's wait after the decode's end (``wanfast generate --timings``' write_mp4 phase). Both
files are checked to be the same bytes. ``--repeats N``: the runs alternate, the fastest of each mode kept
(a shared host's load comes and goes).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from wanfast.specs import parse_size
from wanfast.video import THREADS_ENV, Mp4Writer, write_mp4


def chunks(frames: int) -> list[tuple[int, int]]:
    bounds = [0, *range(1, frames + 1, 4)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def simulate(seconds: float, busy: bool) -> None:
    """One chunk's decode: idle (GPU) or host compute for ``seconds``."""
    if not busy:
        time.sleep(seconds)
        return
    end, a = time.perf_counter() + seconds, torch.randn(256, 256)
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def run(frames: np.ndarray, decode_s: float, busy: bool, folder: Path) -> dict:
    parts, h, w = chunks(len(frames)), frames.shape[1], frames.shape[2]
    per = decode_s / len(parts)
    t0 = time.perf_counter()
    for _ in parts:
        simulate(per, busy)
    t1 = time.perf_counter()
    write_mp4(frames, folder / "seq.mp4")
    t2 = time.perf_counter()
    with Mp4Writer(folder / "stream.mp4", w, h) as writer:
        t3 = time.perf_counter()
        for a, b in parts:
            simulate(per, busy)
            writer.add(frames[a:b])
        t4 = time.perf_counter()
    t5 = time.perf_counter()
    same = (folder / "seq.mp4").read_bytes() == (folder / "stream.mp4").read_bytes()
    return {
        "decode_s": decode_s, "busy_decode": busy, "sequential": {"decode_s": t1 - t0, "write_mp4_s": t2 - t1,
        "total_s": t2 - t0}, "streamed": {"decode_s": t4 - t3, "tail_s": t5 - t4, "total_s": t5 - t3},
        "saved_s": (t2 - t0) - (t5 - t3), "same_bytes": same,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--decode-s", default="0.92", help="simulated decode seconds, comma-separated")
    ap.add_argument("--busy", action="store_true", help="simulate the decode with host compute, not a sleep")
    ap.add_argument("--repeats", type=int, default=1, help="runs per decode time; the best of each is kept")
    ap.add_argument(
        "--threads", default="frame", help="libx264 threading to try: frame, slice (comma-separated)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    w, h = parse_size(args.size)
    frames = np.random.default_rng(0).integers(0, 256, (args.frames, h, w, 3), dtype=np.uint8)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, d in ((k, float(x)) for k in args.threads.split(",") for x in args.decode_s.split(",")):
            os.environ[THREADS_ENV] = kind  # read by every writer this process opens
            runs = [run(frames, d, args.busy, Path(tmp)) for _ in range(args.repeats)]
            best = {
                k: min((x[k] for x in runs), key=lambda v: v["total_s"]) for k in ("sequential", "streamed")
            }
            r = {**runs[0], **best, "threads": kind, "saved_s": best["sequential"]["total_s"] - best["streamed"]["total_s"],
                 "same_bytes": all(x["same_bytes"] for x in runs), "runs": runs}  # fmt: skip
            rows.append(r)
            s, q = r["streamed"], r["sequential"]
            print(f"[{kind}] {w}x{h}x{args.frames} decode {d:.2f} s ({'busy' if args.busy else 'sleep'}): sequential "
                  f"{q['total_s']:.2f} s (write {q['write_mp4_s']:.2f} s), streamed {s['total_s']:.2f} s "
                  f"(tail {s['tail_s']:.2f} s), saved {r['saved_s']:.2f} s, same bytes {r['same_bytes']}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(
            json.dumps({"size": args.size, "frames": args.frames, "runs": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
