"""``wanfast serve --warm-sizes WxHxF[,...]``: each worker runs every configured size once before it says it
is ready, so the first request of that size finds its graphs compiled (and, with ``--compile-cache``, the
compile comes from the cache), cuDNN's VAE choices made and the memory pools grown.

The warm-up is a short generation (``WARM_STEPS`` steps; a two-expert model runs each expert once, the
boundary set between the two steps; unguided, as guidance reruns the same graphs) with a fixed prompt,
and a grey image for a model that needs one. Every rank of a split worker runs it (the ranks' collectives
must match). Rank 0 writes the sizes done to ``<data_dir>/workers/<name>/warm.json`` with its pid;
``/health`` lists them for the worker whose pid it is (a file left by an earlier process does not count).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from wanfast.config import ConfigError

log = logging.getLogger("wanfast.server.warmup")

WARM_STEPS = 2
WARM_PROMPT = "warm-up"
Size = tuple[int, int, int]  # (width, height, frames)


def parse_warm_sizes(text: str, spec) -> list[Size]:
    """'832x480x81,1280x720x81' -> [(832, 480, 81), (1280, 720, 81)], each checked against the model's
    rules (grid multiples, 4n+1 frames) now, before any worker starts."""
    from wanfast.specs import resolve_params

    sizes = []
    for part in (p.strip() for p in text.split(",")):
        fields = part.lower().split("x")
        if len(fields) != 3 or not all(f.isdigit() for f in fields):
            raise ConfigError(f"--warm-sizes: expected WIDTHxHEIGHTxFRAMES, got {part!r}")
        w, h, f = (int(v) for v in fields)
        image_size = (w, h) if spec.image == "required" else None
        resolve_params(spec, WARM_PROMPT, image_size=image_size, size=(w, h), frames=f, steps=WARM_STEPS)
        sizes.append((w, h, f))
    return sizes


def size_text(size: Size) -> str:
    return "x".join(str(v) for v in size)


def warm_file(data_dir: str | os.PathLike, worker: str) -> Path:
    return Path(data_dir) / "workers" / worker / "warm.json"


def _overrides(pipe, size: Size) -> dict:
    w, h, f = size
    over = {"size": (w, h), "frames": f, "steps": WARM_STEPS, "seed": 0}
    if not pipe.settings.cfg_parallel:
        # One conditional pass per step: a guided step runs the same compiled block twice ([1, L, D] input,
        # context padded to text_len either way), so the unconditional pass warms nothing new and would
        # double the warm-up's DiT time (832x480x81 FP8: ~3.9 s of a 14.8 s warm-up on the H200). A
        # CFG-parallel worker keeps the guided pair: its ranks split it, and each rank must warm its half.
        over["guidance"] = 1.0
    if len(pipe.spec.experts) > 1:
        from wanfast.solvers import make_solver

        d = pipe.spec.defaults
        ts = make_solver(d.solver, WARM_STEPS, d.shift).timesteps.tolist()
        over["boundary"] = (ts[0] + ts[1]) / 2000  # first step on the high-noise expert, second on the low
    return over


def warm_up(pipe, sizes: list[Size], on_done=None) -> list[dict]:
    """Run one short generation per size on ``pipe``; ``on_done(rows so far)`` after each. Returns a row
    per size: its text and the seconds it took."""
    image = None
    if pipe.spec.image == "required":
        from PIL import Image

        image = Image.new("RGB", (sizes[0][0], sizes[0][1]), (128, 128, 128)) if sizes else None
    rows = []
    for size in sizes:
        t0 = time.perf_counter()
        img = image.resize(size[:2]) if image is not None else None
        pipe.generate(WARM_PROMPT, image=img, **_overrides(pipe, size))
        rows.append({"size": size_text(size), "seconds": round(time.perf_counter() - t0, 3)})
        log.info("warm: %s in %.1f s", rows[-1]["size"], rows[-1]["seconds"])
        if on_done is not None:
            on_done(rows)
    return rows


def write_warm(data_dir: str | os.PathLike, worker: str, rows: list[dict], pid: int | None = None) -> None:
    path = warm_file(data_dir, worker)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": pid or os.getpid(), "sizes": rows}))
    tmp.replace(path)


def read_warm(data_dir: str | os.PathLike, worker: str, pid: int | None) -> list[str]:
    """The sizes worker ``worker`` (process ``pid``) has warmed; [] for another process's file or none."""
    try:
        data = json.loads(warm_file(data_dir, worker).read_text())
    except (OSError, ValueError):
        return []
    if pid is None or data.get("pid") != pid:
        return []
    return [row["size"] for row in data.get("sizes", [])]
