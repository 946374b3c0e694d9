"""A model under ``--memory-budget GIB`` vs resident: the mode the plan picks and the guided step time in each.

    python3 benchmarks/budget_gpu.py --model ti2v-5B --size 1280x704 --frames 121 --budget 24 --t5-cpu --json OUT.json

Random weights at the spec's real dimensions (``tools.synthetic``), made ready by the builder with the
default engine settings (compile, FA3 where installed); the budget's mode comes from ``memory.plan_memory``
and is enforced with ``memory.enforce_memory_budget``. A guided step is one solver step of the pipeline's
own loop (two DiT forwards), timed after two warm-up steps; the median of ``--steps`` steps is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch

from wanfast.config import EngineSettings
from wanfast.memory import enforce_memory_budget, plan_memory
from wanfast.pipeline import denoise
from wanfast.specs import SPECS, parse_size, resolve_params
from wanfast.tools.synthetic import random_pipeline


def step_times(spec, settings: EngineSettings, params, steps: int) -> dict:
    pipe = random_pipeline(spec, settings.device, settings.dtype, torch.float32, settings=settings)
    g = torch.Generator(settings.device).manual_seed(0)
    x = torch.randn(params.latent_shape(spec.vae), generator=g, device=settings.device)
    ctx = [0.1 * torch.randn(24, spec.dit.text_dim, generator=g, device=settings.device).to(settings.dtype)]
    null = [0.1 * torch.randn(120, spec.dit.text_dim, generator=g, device=settings.device).to(settings.dtype)]
    stamps: list[float] = []

    def tick(*_):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        denoise(pipe.experts, x, ctx, null, params.with_(steps=steps + 2), progress=tick)
    times = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)][2:]
    out = {"offload": settings.offload, "step_s": statistics.median(times), "times_s": times,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
    del pipe
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ti2v-5B", choices=list(SPECS))
    ap.add_argument("--size", default=None)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--budget", type=float, default=24.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--t5-cpu", action="store_true", help="the text encoder on the CPU (in both runs)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=["resident", "budget"], default=None, help="(internal) one side")
    args = ap.parse_args()
    spec = SPECS[args.model]
    params = resolve_params(
        spec, "a fox", size=parse_size(args.size) if args.size else None, frames=args.frames
    )
    base = EngineSettings(device="cuda", text_encoder_device="cpu" if args.t5_cpu else None).resolved()
    planned, why = plan_memory(replace(base, memory_budget_gb=args.budget), spec,
                               [(params.width, params.height, params.frames)])  # fmt: skip
    if args.only:  # one side in this process: compiled graphs keep a built pipeline alive, so never both
        if args.only == "budget":
            enforce_memory_budget(planned)
        out = step_times(spec, planned if args.only == "budget" else base, params, args.steps)
        print("RESULT " + json.dumps(out), flush=True)
        return
    print(why, flush=True)
    sides = {}
    for side in ("resident", "budget"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", side]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        sides[side] = json.loads(proc.stdout.split("RESULT ", 1)[1])
    resident, budget = sides["resident"], sides["budget"]
    result = {"model": spec.name, "size": f"{params.width}x{params.height}", "frames": params.frames,
              "budget_gib": args.budget, "text_encoder": base.text_encoder_device or "cuda", "plan": why, "resident": resident, "budget": budget,
              "ratio": budget["step_s"] / resident["step_s"], "device": torch.cuda.get_device_name(),
              "torch": torch.__version__}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
