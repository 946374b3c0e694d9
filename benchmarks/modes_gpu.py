"""Memory modes and the 4-step preset on the GPU, A14B dims, random weights, 1280x720x81 (issue #7).

    python benchmarks/modes_gpu.py --out modes.json --commit abc1234 [--parts budget24,lightning,budget48]
        [--deadline 540]

- ``budget24`` / ``budget48``: the memory mode the budget picks (``wanfast.memory.plan_memory``: the
  fastest that fits), the budget enforced with ``wanfast.memory.enforce_memory_budget`` before the
  first request, then a 3-step generation whose boundary falls after step 2: step 1 (high-noise expert,
  compiles), step 2 (high-noise, warm), step 3 (low-noise, warm; in expert mode after the swap). The warm
  step times against the resident step measured in the 40-step run (20.107 s median, commit d12bf05,
  benchmarks/results/2026-11-23_gen720_40step_wanfast_h200.json) give the slowdown.
- ``lightning``: the ``lightning-4step`` sampling preset (4 steps, guidance 1.0: one DiT pass per step,
  Euler, shift 5), all resident, EngineSettings() defaults: a cold generation (compiles) then a warm one.
  A merged LoRA changes weight values only, so random weights time it exactly.

- ``stepcache``: 832x480x81, 8 steps, all resident, defaults: thresholds 0 (off), 0.05, 0.2 and 1e9 (skip
  all but the forced first/last forward of each expert and branch): denoise time, forwards computed and
  skipped (``GenerationResult.forwards``), final-latent relative error vs threshold 0, and the cost of a
  skipped forward (from the 1e9 run: (denoise - computed x the forward time of the 0 run) / skipped).
  Random weights say nothing about real skip rates: this times the mechanism, not the quality.

Each part writes its record into the JSON as soon as it ends; a part that would start after
``--deadline`` seconds is recorded as skipped (the device call has a hard limit).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from wanfast.config import EngineSettings
from wanfast.presets import sampling_overrides
from wanfast.solvers import make_solver
from wanfast.specs import SPECS
from wanfast.tools.synthetic import random_pipeline

GiB = 2**30
RESIDENT_STEP_S = 20.107  # median step, 40-step 720p run, all resident (see the docstring)
RESIDENT_TOTAL_S = 806.32
RESIDENT_PEAK_GIB = 76.45
SIZE = {"t2v-A14B": ((1280, 720), 81), "tiny": ((64, 48), 5)}
STEPCACHE_SIZE = {"t2v-A14B": ((832, 480), 81), "tiny": ((64, 48), 5)}
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}
PROMPT = "a red fox trotting through fresh snow in a pine forest at dawn, cinematic, slow motion"


def timed_run(pipe, params) -> dict:
    """One generation with a device-synchronised time stamp after every step."""
    stamps = [time.perf_counter()]

    cuda = pipe.device.type == "cuda"

    def progress(i: int, n: int, expert: str) -> None:
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = pipe.run(params, progress)
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    steps[0] = stamps[1] - stamps[0] - result.timings.get("text_encoding", 0.0)  # stamp 0 is before text
    return {
        "total_s": round(total, 3),
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "step_s": [round(s, 3) for s in steps],
        "steps_per_expert": result.steps_per_expert,
        "peak_allocated_GiB": round(torch.cuda.max_memory_allocated() / GiB, 2) if cuda else None,
        "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / GiB, 2) if cuda else None,
        "finite": bool(torch.isfinite(result.latents).all()),
    }


def host_memory_gib() -> dict:
    """This process's resident host memory by kind (Linux /proc/self/status): pinned weight buffers show
    as anonymous (cudaHostRegister) or shared (cudaHostAlloc) memory."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmRSS", "RssAnon", "RssShmem", "VmLck", "VmPin"):
                    out[key] = round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return out


def budget_part(preset, budget_gib: float, device: str) -> dict:
    from wanfast.memory import enforce_memory_budget, plan_memory

    size, frames = SIZE[preset.name]
    base = EngineSettings(
        device=device, dtype=DTYPE[device], vae_dtype=DTYPE[device], text_encoder_device="cpu",
        memory_budget_gb=budget_gib,
    ).resolved()  # plan_memory takes resolved settings (builder.plan resolves them first)  # fmt: skip
    settings, reason = plan_memory(base, preset, [(*size, frames)])  # the fastest mode whose estimate fits
    mode = settings.offload
    t0 = time.perf_counter()
    pipe = random_pipeline(preset, device, DTYPE[device], DTYPE[device], settings=settings)
    gc.collect()
    setup_s = time.perf_counter() - t0
    host = host_memory_gib()
    if device == "cuda":
        torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated() if device == "cuda" else 0
    fraction = enforce_memory_budget(settings)
    ts = make_solver("unipc", 3, 12.0).timesteps.tolist()
    params = pipe.params(PROMPT, size=size, frames=frames, steps=3, boundary=(ts[1] + ts[2]) / 2000)
    try:
        run = timed_run(pipe, params)
        error = None
    except torch.OutOfMemoryError as e:
        run, error = None, f"out of memory under the budget: {e}"
    finally:
        if fraction is not None:
            torch.cuda.set_per_process_memory_fraction(1.0)
    row = {"budget_GiB": budget_gib, "mode": mode, "reason": reason, "fraction": fraction,
           "text_encoder": "cpu", "setup_s": round(setup_s, 1),
           "resident_after_setup_GiB": round(resident / GiB, 2), "host_after_setup_GiB": host,
           "run": run, "error": error}  # fmt: skip
    if run is not None:
        warm_high, warm_low = run["step_s"][1], run["step_s"][2]
        row["fits"] = fraction is not None and run["peak_reserved_GiB"] <= budget_gib
        row["warm_step_high_s"], row["warm_step_low_s"] = warm_high, warm_low
        row["slowdown_per_step_vs_resident"] = round(max(warm_high, warm_low) / RESIDENT_STEP_S, 3)
        # composed: what a 40-step run would take in this mode (26 high + 14 low steps, as measured)
        t = run["timings_s"]
        composed = t["text_encoding"] + 26 * warm_high + 14 * warm_low + t["vae_decode"]
        row["composed_40_step_s"] = round(composed, 1)
        row["composed_slowdown_vs_resident_40_step"] = round(composed / RESIDENT_TOTAL_S, 3)
    del pipe
    return row


def lightning_part(preset, device: str) -> dict:
    pipe = random_pipeline(
        preset, device, DTYPE[device], DTYPE[device], settings=EngineSettings(device=device)
    )
    (w, h), frames = SIZE[preset.name]
    params = pipe.params(PROMPT, size=(w, h), frames=frames, **sampling_overrides("lightning-4step", preset))
    cold = timed_run(pipe, params)
    warm = timed_run(pipe, params)
    del pipe
    return {"preset": "lightning-4step", "params": {k: getattr(params, k) for k in
            ("steps", "solver", "shift", "guidance_high_noise", "guidance_low_noise", "boundary")},
            "cold": cold, "warm": warm, "target_s": 60.0, "meets_target_warm": warm["total_s"] <= 60.0}  # fmt: skip


def stepcache_part(preset, device: str) -> dict:
    pipe = random_pipeline(
        preset, device, DTYPE[device], DTYPE[device], settings=EngineSettings(device=device)
    )
    size, frames = STEPCACHE_SIZE[preset.name]
    base = pipe.params(PROMPT, size=size, frames=frames, steps=8)
    timed_run(pipe, base.with_(steps=2))  # warm-up: compiles
    rows, ref = {}, None
    for threshold in (0.0, 0.05, 0.2, 1e9):
        params = base.with_(step_cache_threshold=threshold)
        result = pipe.run(params)  # a second pass for the latents: timed_run does not keep them
        run = timed_run(pipe, params)
        ref = result.latents if ref is None else ref
        err = float((result.latents - ref).norm() / ref.norm())
        rows[str(threshold)] = {**run, "forwards": result.forwards, "latent_rel_err_vs_off": err}
    off, all_ = rows["0.0"], rows["1000000000.0"]
    per_forward = off["timings_s"]["denoise"] / off["forwards"]["computed"]
    skipped = all_["forwards"]["skipped"]
    cost = (all_["timings_s"]["denoise"] - all_["forwards"]["computed"] * per_forward) / max(skipped, 1)
    del pipe
    return {"size": f"{size[0]}x{size[1]}", "frames": frames, "steps": 8, "runs": rows,
            "computed_forward_s": round(per_forward, 4), "skipped_forward_s": round(cost, 4)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--parts", default="budget24,lightning,budget48")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds after start: no part starts later")
    ap.add_argument("--min-left", type=float, default=150.0, help="a part needs this many seconds left")
    ap.add_argument("--model", default="t2v-A14B", choices=["t2v-A14B", "tiny"], help="tiny: a CPU smoke run")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    start = time.perf_counter()
    preset, dev = SPECS[args.model], args.device
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "model": args.model, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "commit": args.commit, "size": "1280x720", "frames": 81, "parts": {}}  # fmt: skip
    for part in args.parts.split(","):
        left = args.deadline - (time.perf_counter() - start)
        if left < args.min_left:
            res["parts"][part] = {"skipped": f"only {left:.0f} s left of the call's deadline"}
        else:
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    if part == "lightning":
                        row = lightning_part(preset, dev)
                    elif part == "stepcache":
                        row = stepcache_part(preset, dev)
                    else:
                        row = budget_part(preset, float(part[6:]), dev)
            except Exception as e:  # record and go on: the next part may still run
                row = {"error": f"{type(e).__name__}: {e}"}
            row["part_wall_s"] = round(time.perf_counter() - t0, 1)
            res["parts"][part] = row
            gc.collect()
            torch._dynamo.reset()
            if dev == "cuda":
                torch.cuda.empty_cache()
        print(part, json.dumps(res["parts"][part])[:1500], flush=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
