"""Memory modes on the GPU: one A14B DiT forward at 832x480x81, resident vs --offload blocks / expert.

    python benchmarks/offload_gpu.py --out offload.json

Checks that the offloaded output equals the resident one (same kernels, same weights: bit-exact) and
records the forward time and the peak device memory of each mode (eager, compile off, so the modes
compare like for like). Random weights, bf16.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from wanfast.accel.offload import apply_offload
from wanfast.config import EngineSettings
from wanfast.specs import SPECS
from wanfast.tools.synthetic import random_pipeline


def forward(pipe, x, t, ctx) -> tuple[torch.Tensor, float, float]:
    model = pipe.experts["high_noise"]
    with torch.inference_mode():
        model(x, t, ctx)  # warm-up (and the first block fetches)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = model(x, t, ctx)
        torch.cuda.synchronize()
    return out.float().cpu(), time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    preset = SPECS["t2v-A14B"]
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 16, 21, 60, 104, device="cuda", generator=g)
    t = torch.tensor([900.0], device="cuda")
    ctx = [torch.randn(64, 4096, device="cuda", generator=g, dtype=torch.bfloat16)]
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    ref = None
    for mode in (None, "blocks", "expert"):
        settings = EngineSettings(device="cuda", compile=False)
        pipe = random_pipeline(preset, "cuda", torch.bfloat16, torch.bfloat16, settings=settings)
        if mode is not None:
            apply_offload(pipe, mode)
            torch.cuda.empty_cache()
        resident = torch.cuda.memory_allocated() / 2**30
        out, secs, peak = forward(pipe, x, t, ctx)
        ref = out if ref is None else ref
        row = {"forward_s": round(secs, 3), "peak_GiB": round(peak, 2), "resident_after_setup_GiB": round(resident, 2),
               "equal_to_resident": bool(torch.equal(out, ref)), "finite": bool(torch.isfinite(out).all())}  # fmt: skip
        res[mode or "resident"] = row
        print(mode or "resident", row, flush=True)
        del pipe
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
