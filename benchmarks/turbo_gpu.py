"""Issue #17 part 1 on nvidia-h200: the turbo combination end to end, T2V-A14B at real dims, random weights.

Turbo = ``--sampling-preset lightning-4step`` (4 Euler steps, guidance 1: one DiT pass per step) with the
fast mode ``--quant fp8 --self-attention fa3-fp8``, bf16 VAE, in a warm process: text encoding, 4 steps, VAE
decode and the MP4 written, as ``wanfast generate`` runs them (``WanPipeline.run`` feeding a
``video.Mp4Writer`` during the decode).
Per size: one warm-up run (compile, cuDNN autotuning), then ``--repeats`` timed runs.

``--ulysses 2`` under ``torchrun --nproc-per-node 2`` (nvidia-h200-x2) splits every step over the GPUs
(issue #20 part 3): rank 0 times, writes the MP4 and compares; the others run their share.

Quality (random weights, so a statement about the arithmetic, not about pictures): the 4-step FP8 video
against the 4-step bf16 video of the same weights, prompt and seed (the bf16 pipeline runs first, once per
size, then is freed): video PSNR / SSIM and the final latents' relative error.

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/turbo_gpu.py --sizes 1280x720,832x480 --out turbo.json
    PYTHONPATH=/tmp/site:$PWD torchrun --nproc-per-node 2 benchmarks/turbo_gpu.py --ulysses 2 --out t_u2.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from wanfast.config import EngineSettings
from wanfast.parallel import init_distributed, parallel_settings
from wanfast.presets import sampling_overrides
from wanfast.specs import SPECS, parse_size
from wanfast.tools.compare import compare_latents, compare_videos
from wanfast.tools.synthetic import random_pipeline
from wanfast.video import Mp4Writer, finish_mp4, stream_mp4_enabled

PROMPT = "a red fox trotting through fresh snow in a pine forest at dawn, cinematic, slow motion"
FAST = {"quant": "fp8", "self_attention_backend": "fa3-fp8"}


RANK = [0]  # this process's rank (0 without torchrun)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0's clock covers every rank's share


def timed_run(pipe, params, folder: Path, name: str) -> tuple[dict, object]:
    """One request as ``wanfast generate`` runs it: pipeline + MP4, wall clock, GPU synchronised. The MP4
    is encoded during the decode (``WANFAST_STREAM_MP4=0``: after it), so ``write_mp4_s`` is what is left
    of it after the run."""
    path, fps = folder / f"{name}.mp4", pipe.defaults.fps
    _sync()
    t0 = time.perf_counter()
    writer = (
        Mp4Writer(path, params.width, params.height, fps=fps)
        if RANK[0] == 0 and stream_mp4_enabled()
        else None
    )
    result = pipe.run(params, frames_sink=writer.add if writer is not None else None)
    _sync()
    t1 = time.perf_counter()
    if RANK[0] == 0:
        finish_mp4(writer, result.frames, path, fps)
    total = time.perf_counter() - t0
    streamed = writer is not None
    return {"total_s": total, "run_s": t1 - t0, "write_mp4_s": total - (t1 - t0), "mp4_streamed": streamed,
            **result.timings}, result  # fmt: skip


def run_engine(args, label: str, settings: EngineSettings, repeats: int, tmp: Path):
    """Build, then per size a warm-up run and ``repeats`` timed ones (0: the warm-up is the result)."""
    spec, cuda = SPECS[args.model], args.device.startswith("cuda")
    if args.ulysses > 1:
        settings = parallel_settings(replace(settings, ulysses=args.ulysses, device=args.device))
    t0 = time.perf_counter()
    pipe = random_pipeline(spec, args.device, torch.bfloat16, torch.bfloat16, seed=0, settings=settings)
    out = {"build_s": time.perf_counter() - t0, "sizes": {}}
    results = {}
    for w, h in args.size_list:
        over = sampling_overrides("lightning-4step", spec)
        params = pipe.params(PROMPT, size=f"{w}x{h}", frames=args.frames, seed=0, **over)
        warm, result = timed_run(pipe, params, tmp, f"{label}_warm")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        runs = []
        for i in range(repeats):
            r, result = timed_run(pipe, params, tmp, f"{label}_{w}x{h}_{i}")
            runs.append(r)
        best = min(runs or [warm], key=lambda r: r["total_s"])
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        out["sizes"][f"{w}x{h}"] = {
            "warmup": warm,
            "runs": runs,
            "best_total_s": best["total_s"],
            "peak_GiB": peak,
        }
        results[(w, h)] = result
        if RANK[0] == 0:
            print(f"[{label}] {w}x{h}x{args.frames}: {best['total_s']:.2f} s end to end "
                  f"(steps {best.get('denoise', 0):.2f} s, decode {best.get('vae_decode', 0):.2f} s)", flush=True)  # fmt: skip
    del pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1280x720,832x480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="turbo.json")
    ap.add_argument("--model", default="t2v-A14B", help="tiny: the CPU test of this script")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ulysses", type=int, default=1, help="split each step over this many GPUs (torchrun)")
    ap.add_argument(
        "--no-quality", action="store_true", help="turbo times only: no bf16 4-step reference run"
    )
    args = ap.parse_args()
    args.size_list = [parse_size(s) for s in args.sizes.split(",")]
    RANK[0], local = init_distributed() if args.ulysses > 1 else (0, 0)
    if args.device == "cuda":
        args.device = f"cuda:{local}"
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    res: dict = {"date": time.strftime("%Y-%m-%d"), "commit": os.environ.get("WANFAST_COMMIT", "unknown"),
                 "device": dev, "model": args.model, "torch": torch.__version__, "frames": args.frames,
                 "ulysses": args.ulysses, "preset": "lightning-4step", "fast": FAST, "vae_dtype": "bf16",
                 "weights": "random (quality numbers compare arithmetic, not pictures)"}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ref = {}
        if not args.no_quality:
            res["bf16"], ref = run_engine(args, "bf16", EngineSettings(), 0, Path(tmp))
        fast = (
            replace(EngineSettings(), **FAST)
            if args.device.startswith("cuda")
            else EngineSettings(quant="fp8")
        )
        res["turbo"], got = run_engine(args, "turbo", fast, args.repeats, Path(tmp))
    if RANK[0] != 0:
        return
    res["quality"] = {}
    for key in ref:
        vid, lat = (
            compare_videos(got[key].frames, ref[key].frames),
            compare_latents(got[key].latents, ref[key].latents),
        )
        q = {"video_psnr_db": vid["psnr_db"], "video_ssim": vid["ssim"], "latent_rel_err": lat["rel_err"]}
        res["quality"][f"{key[0]}x{key[1]}"] = q
        print(f"[quality] {key[0]}x{key[1]}: 4-step FP8 vs 4-step bf16 video PSNR {q['video_psnr_db']:.2f} dB, "
              f"SSIM {q['video_ssim']:.4f}, latents rel err {q['latent_rel_err']:.4f}", flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps(res, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
