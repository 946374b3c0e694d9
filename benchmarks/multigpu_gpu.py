"""Multi-GPU scaling (issue #6): one DiT forward, one guided step and a whole generation per split, A14B dims,
random weights, launched with torchrun (one process per GPU). Rank 0 writes the JSON.

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1   # multicast off
    torchrun --nproc-per-node 2 benchmarks/multigpu_gpu.py --split cfg2 --out cfg2.json --commit abc1234
    # splits: one (1 process), cfg2 / u2 (2), cfg2xu2 / u4 (4), cfg2xu4 / u8 (8)
    # --sizes 832x480,1280x720 --steps 40 --what forward,step,generate; --model tiny --device cpu: a CPU check
    # --ulysses-chunks G: Ulysses head groups whose all-to-alls overlap the attention (1 = off, the default)

Per size, after a 2-step warm-up generation whose boundary falls between its steps (compiles both experts):
- ``forward``: one call of the high-noise expert with the prompt (under CFG-parallel each rank runs one
  such call per step, so this equals the one-GPU forward; under Ulysses it is split);
- ``step``: one guided prediction (both guidance passes: ``ParallelRuntime.predict``), what a step costs;
- ``generate``: the whole ``--steps`` request (text encoding once on rank 0 and broadcast, denoising,
  VAE decode tiled across ranks), its stage timings from ``WanPipeline.run``.
Times are the slowest rank's (all-reduce max) of each call, the median over ``--repeats``. A 40-step
1280x720 generation on one GPU takes ~13.5 min (806 s measured), longer than one device call: run it
through ``benchmarks/detached.sh`` or compare with that measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from wanfast.config import EngineSettings
from wanfast.parallel import init_distributed, parallel_settings
from wanfast.parallel.dist import check_split
from wanfast.pipeline import guided_prediction
from wanfast.solvers import make_solver
from wanfast.specs import SPECS
from wanfast.tools.synthetic import random_pipeline

SPLITS = {"one": (False, 1), "cfg2": (True, 1), "u2": (False, 2), "cfg2xu2": (True, 2), "u4": (False, 4),
          "cfg2xu4": (True, 4), "u8": (False, 8)}  # fmt: skip
PROMPT = "a red fox trotting through fresh snow in a pine forest at dawn, cinematic, slow motion"


def slowest(seconds: float) -> float:
    """The slowest rank's time: a split step is as fast as its last rank."""
    if not dist.is_initialized():
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CPU_GROUP[0])
    return float(t)


_CPU_GROUP: list = [None]  # a gloo group for the timing reduce: no device work in the measured interval


def timed(fn, device: torch.device) -> float:
    if dist.is_initialized():
        dist.barrier(group=_CPU_GROUP[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return slowest(time.perf_counter() - t0)


def measure(pipe, params, what: set[str], repeats: int, device: torch.device) -> dict:
    """One size: the forward, the guided step and the whole generation (each the slowest rank's time)."""
    row = {}
    prompts = [params.prompt, params.negative_prompt]
    if pipe.parallel:
        ctx, ctx_null = pipe.parallel.encode(pipe.text_encoder, prompts, device)
    else:
        ctx, ctx_null = (c.to(device) for c in pipe.text_encoder.encode(prompts))
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(params.latent_shape(pipe.vae.cfg), generator=g, device=device)[None]  # [1, C, F', H', W']
    t = torch.full((1,), 999.0, device=device)
    model = pipe.experts["high_noise"]
    predict = pipe.parallel.predict if pipe.parallel else guided_prediction
    if "forward" in what:
        times = [timed(lambda: model(x, t, [ctx]), device) for _ in range(repeats)]
        row["forward_s"] = round(statistics.median(times), 4)
    if "step" in what:
        times = [timed(lambda: predict(model, x, t, [ctx], [ctx_null], params.guidance_high_noise), device)
                 for _ in range(repeats)]  # fmt: skip
        row["step_s"] = round(statistics.median(times), 4)
    if "generate" in what:
        out = {}
        row["generate_s"] = round(timed(lambda: out.update(r=pipe.run(params)), device), 3)
        r = out["r"]
        row["generate"] = {"steps": params.steps, "stages_s": {k: round(v, 3) for k, v in r.timings.items()},
                           "steps_per_expert": r.steps_per_expert, "finite": bool(torch.isfinite(r.latents).all()),
                           "peak_memory_GiB": round((r.peak_memory_bytes or 0) / 2**30, 2)}  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", choices=list(SPLITS), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=os.environ.get("WANFAST_COMMIT", "unknown"))
    ap.add_argument("--model", choices=["t2v-A14B", "tiny"], default="t2v-A14B")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="832x480,1280x720")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--what", default="forward,step,generate")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ulysses-chunks", type=int, default=1, metavar="G",
                    help="head groups whose all-to-alls overlap the attention; 1 = off, the measured default")  # fmt: skip
    args = ap.parse_args()
    preset = SPECS[args.model]
    cfg_parallel, ulysses = SPLITS[args.split]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    chunks = args.ulysses_chunks
    check_split(cfg_parallel, ulysses, world, preset.dit.num_heads, chunks)  # before any weights are built
    rank, local = init_distributed()
    if dist.is_initialized():
        _CPU_GROUP[0] = dist.new_group(backend="gloo")
    device = torch.device(f"cuda:{local}" if args.device == "cuda" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = EngineSettings(
        device=str(device),
        dtype=dtype,
        vae_dtype=dtype,
        cfg_parallel=cfg_parallel,
        ulysses=ulysses,
        ulysses_chunks=chunks,
    )
    settings = parallel_settings(base) if base.split else base
    t0 = time.perf_counter()
    pipe = random_pipeline(preset, str(device), dtype, dtype, settings=settings)  # split by builder.assemble
    res = {"split": args.split, "world": world, "cfg_parallel": cfg_parallel, "ulysses": ulysses,
           "ulysses_chunks": chunks, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "commit": args.commit, "date": time.strftime("%Y-%m-%d"),
           "model": args.model, "settings": {k: str(v) for k, v in vars(settings).items()},
           "setup_s": round(time.perf_counter() - t0, 1), "env": {k: os.environ.get(k) for k in
           ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")}, "sizes": {}}  # fmt: skip
    what = set(args.what.split(","))
    with torch.inference_mode():
        for size in args.sizes.split(","):
            w, h = (int(v) for v in size.split("x"))
            params = pipe.params(PROMPT, size=(w, h), frames=args.frames, steps=args.steps)
            ts = make_solver(params.solver, 2, params.shift).timesteps.tolist()
            warm = pipe.run(params.with_(steps=2, boundary=(ts[0] + ts[1]) / 2000))  # compiles both experts
            row = {"frames": params.frames, "warmup_s": round(warm.timings["total"], 3)}
            row.update(measure(pipe, params, what, args.repeats, device))
            res["sizes"][size] = row
            if rank == 0:
                print(args.split, size, json.dumps(row), flush=True)
                with open(args.out, "w") as f:
                    json.dump(res, f, indent=1)
    if dist.is_initialized():
        dist.barrier(group=_CPU_GROUP[0])
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
