"""The whole T2V-A14B pipeline at real dimensions with random weights, on one GPU.

Both experts (bf16), UMT5-XXL (bf16) and the Wan2.1 VAE (fp32, as official), 832x480, 81 frames.
Proves the real-size path runs end to end and records per-stage times and peak memory.

    python benchmarks/pipeline_real_dims.py --out results.json [--steps 2] [--size 832x480]

With 2 steps the default shift (12) puts both timesteps above the 0.875 boundary, so the run uses
``--boundary 0.95``: step 1 (t=999) on the high-noise expert, step 2 (t=922) on the low-noise one.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch

from wanfast import attention
from wanfast.specs import SPECS
from wanfast.tools.synthetic import random_pipeline


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--boundary", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=2, help="runs; the first includes warm-up")
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))

    backend = attention.set_backend("auto", "cuda")
    t0 = time.perf_counter()
    pipe = random_pipeline(SPECS["t2v-A14B"], "cuda", torch.bfloat16, torch.float32)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30
    print(f"built random A14B pipeline in {build_s:.1f} s, {weights_gib:.1f} GiB on the GPU", flush=True)

    params = pipe.params(
        "a cat walking on the beach at sunset", size=(w, h), frames=args.frames, steps=args.steps,
        boundary=args.boundary, seed=0,
    )  # fmt: skip
    runs = []
    for r in range(args.repeats):
        res = pipe.run(params)
        lat = res.latents
        run = {
            "timings_s": {k: round(v, 4) for k, v in res.timings.items()},
            "steps_per_expert": res.steps_per_expert,
            "peak_memory_GiB": round(res.peak_memory_bytes / 2**30, 2),
            "latents_shape": list(lat.shape),
            "latents_finite": bool(torch.isfinite(lat).all()),
            "frames_shape": list(res.frames.shape),
        }
        runs.append(run)
        print(f"run {r}: {json.dumps(run)}", flush=True)

    out = {
        "what": "whole T2V-A14B pipeline, random weights, real dims",
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": args.commit or git_commit(),
        "attention_backend": backend,
        "size": [w, h],
        "frames": args.frames,
        "steps": args.steps,
        "boundary": args.boundary,
        "dtypes": {"dit": "bf16", "text_encoder": "bf16", "vae": "fp32"},
        "build_s": round(build_s, 1),
        "weights_GiB": round(weights_gib, 2),
        "runs": runs,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
