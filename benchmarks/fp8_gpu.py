"""GPU study of the FP8 linears (``--quant fp8``): per-layer error, speed, weight memory, generation quality.

    PYTHONPATH=. python benchmarks/fp8_gpu.py --out fp8.json

Random weights (``wanfast.tools.synthetic``) at A14B dims; attention backend as ``auto`` picks (FA3 on Hopper).
1. error study, eager, fused projections, latents [1, 16, 3, 30, 52] (1,170 tokens), t in {900, 200}:
   the DiT output relative error ||fp8 - bf16|| / ||bf16|| when only one linear type, or only one block,
   is FP8; and everything (the default policy). Policy rule: a block stays bf16 if it alone causes more
   than a quarter of the all-FP8 error (a fair share is 1/40); printed as ``recommended_policy``.
2. DiT forward at 832x480x81 (latents [1, 16, 21, 60, 104], 32,760 tokens): default settings (fused,
   caches, compiled) bf16 vs the same + quant fp8; median of 3 after 2 warm-ups (CUDA events).
3. Weight memory of one expert (bytes of parameters and persistent buffers), bf16 vs fp8.
4. A 10-step two-expert generation at 480x272, 17 frames, seed 0, eager: bf16, then the same pipeline
   with its experts quantised: latent relative error, decoded-video PSNR / SSIM (``wanfast.tools.compare``).
   With ``--self-attention NAME`` (an 8-bit backend such as fa3-fp8), a third run: FP8 linears plus that
   self-attention backend, compared with the same bf16 run (``generation["fp8+" + NAME]``).
   With ``--row-kernels``, the FP8 runs quantise the inputs of the FFN's second linear and the attention
   output projections with ``kernels.rowquant`` (``accel.fp8.use_row_kernels``, what ``optimize_dit`` does
   by default: the shipped fast path).

Writes JSON to --out and prints one summary line per part. Measured on an H200 (torch 2.11, 2026-11-23): ~2 min wall (study
13 s, speed 60 s, generation 16 s, plus builds and imports).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import replace

import torch
from torch import nn

from wanfast import attention
from wanfast.accel import optimize_dit
from wanfast.accel.fp8 import (
    DEFAULT_POLICY,
    LINEAR_TYPES,
    FP8Linear,
    Policy,
    parameter_bytes,
    quantize_dit_,
    use_row_kernels,
)
from wanfast.accel.fuse import fuse_projections
from wanfast.config import EngineSettings
from wanfast.specs import SPECS
from wanfast.tools.compare import compare_latents, compare_videos
from wanfast.tools.synthetic import random_dit, random_pipeline

BF16, DEV = torch.bfloat16, "cuda"
A14B = SPECS["t2v-A14B"]
SMALL_LATENT, LATENT_480P = (1, 16, 3, 30, 52), (1, 16, 21, 60, 104)
DEFAULT = EngineSettings(device=DEV, dtype=BF16, compile=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(DEV).manual_seed(seed)
    x = torch.randn(shape, device=DEV, generator=g)
    ctx = torch.randn(1, A14B.dit.text_len, A14B.dit.text_dim, device=DEV, generator=g).to(BF16)
    return x, ctx


def swap_in_fp8(dit: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """Quantise only the Linears ``names``; returns the originals so ``restore`` can put them back."""
    originals = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = dit.get_submodule(parent_name)
        originals[name] = getattr(parent, child)
        setattr(parent, child, FP8Linear.from_linear(originals[name]))
    return originals


def restore(dit: nn.Module, originals: dict[str, nn.Linear]) -> None:
    for name, lin in originals.items():
        parent_name, _, child = name.rpartition(".")
        setattr(dit.get_submodule(parent_name), child, lin)


@torch.inference_mode()
def error_study(out: dict) -> None:
    dit = random_dit(A14B, DEV, BF16, seed=1)
    fuse_projections(dit)
    x, ctx = inputs(SMALL_LATENT)
    ts = [torch.tensor([900.0], device=DEV), torch.tensor([200.0], device=DEV)]
    refs = [dit(x, t, ctx) for t in ts]
    eligible = [n for n, m in dit.named_modules() if type(m) is nn.Linear and Policy().quantizes(n)]

    def err_of(names: list[str]) -> float:
        originals = swap_in_fp8(dit, names)
        errs = [rel_err(dit(x, t, ctx), ref) for t, ref in zip(ts, refs, strict=True)]
        restore(dit, originals)
        return statistics.mean(errs)

    def kind(name: str) -> str:
        return LINEAR_TYPES[name.split(".", 2)[2]]

    study = {"all": err_of(eligible)}
    study["by_type"] = {
        ty: err_of([n for n in eligible if kind(n) == ty]) for ty in sorted(set(LINEAR_TYPES.values()))
    }
    n_layers = A14B.dit.num_layers
    study["by_block"] = [
        err_of([n for n in eligible if n.startswith(f"blocks.{b}.")]) for b in range(n_layers)
    ]
    study["by_block_group"] = {
        f"{g}-{g + 7}": err_of([n for n in eligible if int(n.split(".")[1]) // 8 == g // 8])
        for g in range(0, n_layers, 8)
    }
    keep = tuple(b for b, e in enumerate(study["by_block"]) if e > 0.25 * study["all"])
    study["recommended_policy"] = Policy(keep_blocks=keep).to_json()
    if keep:
        policy = Policy(keep_blocks=keep)
        study["all_with_recommended_policy"] = err_of([n for n in eligible if policy.quantizes(n)])
    out["error_study"] = study
    print(f"[study] all-FP8 rel err {study['all']:.4f}; by type " +
          ", ".join(f"{k} {v:.4f}" for k, v in study["by_type"].items()), flush=True)  # fmt: skip
    print("[study] by block " + " ".join(f"{e:.4f}" for e in study["by_block"]), flush=True)
    print(f"[study] recommended policy {study['recommended_policy']}", flush=True)

    # 3. weight memory of the expert, before and after (same module: bf16 first)
    bf16_bytes = parameter_bytes(dit)
    quantize_dit_(dit, DEFAULT_POLICY)
    release()
    out["memory"] = {"bf16_bytes": bf16_bytes, "fp8_bytes": parameter_bytes(dit),
                     "fp8_GB": parameter_bytes(dit) / 1e9, "bf16_GB": bf16_bytes / 1e9,
                     "target_GB": 15.5}  # fmt: skip
    print(f"[memory] expert weights bf16 {bf16_bytes / 1e9:.2f} GB -> fp8 {out['memory']['fp8_GB']:.2f} GB")
    # dit and refs are freed when this returns (err_of closes over them, so no del here)


@torch.inference_mode()
def time_forward(settings: EngineSettings, warmup: int = 2, repeats: int = 3) -> dict:
    torch._dynamo.reset()  # the bf16 run's compiled entries must not count against the fp8 run's cache
    dit = optimize_dit(random_dit(A14B, DEV, BF16, seed=1), settings)
    x, ctx = inputs(LATENT_480P)
    t = torch.tensor([900.0], device=DEV)
    t0 = time.perf_counter()
    y = dit(x, t, ctx)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        dit(x, t, ctx)
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y = dit(x, t, ctx)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1000)
    res = {"median_s": statistics.median(times), "times_s": times, "first_call_s": first,
           "peak_GiB": torch.cuda.max_memory_allocated() / 2**30, "out": y.float().cpu()}  # fmt: skip
    del dit, y
    release()
    return res


def speed(out: dict) -> None:
    bf16 = time_forward(DEFAULT)
    torch.cuda.reset_peak_memory_stats()
    fp8 = time_forward(replace(DEFAULT, quant="fp8"))
    err = rel_err(fp8.pop("out"), bf16.pop("out"))
    ref = 3.36  # Diffusers' 480p DiT forward measured on this machine kind (task statement)
    out["speed_480p"] = {"bf16": bf16, "fp8": fp8, "fp8_vs_bf16_rel_err": err, "diffusers_s": ref,
                         "fp8_over_diffusers": fp8["median_s"] / ref, "target_ratio": 0.75,
                         "fp8_over_bf16": fp8["median_s"] / bf16["median_s"]}  # fmt: skip
    print(f"[speed] 480p forward bf16 {bf16['median_s']:.3f} s, fp8 {fp8['median_s']:.3f} s "
          f"({fp8['median_s'] / ref:.3f}x Diffusers' {ref} s; target <= 0.75), rel err {err:.4f}", flush=True)  # fmt: skip


def _quality(q, ref, seconds: float) -> dict:
    lat, vid = compare_latents(q.latents, ref.latents), compare_videos(q.frames, ref.frames)
    return {"latent_rel_err": lat["rel_err"], "latent_psnr_db": lat["psnr_db"], "video_psnr_db": vid["psnr_db"],
            "video_ssim": vid["ssim"], "video_psnr_per_frame_db": vid["psnr_per_frame_db"],
            "video_ssim_per_frame": vid["ssim_per_frame"], "eager_seconds": seconds}  # fmt: skip


@torch.inference_mode()
def generation(out: dict, self_attention: str | None = None, row_kernels: bool = False) -> None:
    pipe = random_pipeline(A14B, DEV, BF16, torch.float32, settings=replace(DEFAULT, compile=False))
    params = pipe.params("a red fox running through fresh snow", size=(480, 272), frames=17, steps=10, seed=0)
    t0 = time.perf_counter()
    ref = pipe.run(params)
    t_bf16 = time.perf_counter() - t0
    for dit in pipe.experts.values():
        quantize_dit_(dit, DEFAULT_POLICY)
        if row_kernels:
            use_row_kernels(dit)
    release()
    runs = {"fp8": None} if self_attention is None else {"fp8": None, f"fp8+{self_attention}": self_attention}
    gen = out["generation"] = {"size": "480x272x17", "steps": 10, "steps_per_expert": ref.steps_per_expert,
                               "bar_psnr_db": 30.0, "eager_seconds_bf16": t_bf16, "row_kernels": row_kernels}  # fmt: skip
    for label, backend in runs.items():
        attention.set_self_attention_backend(backend, DEV)
        t0 = time.perf_counter()
        q = pipe.run(params)
        res = _quality(q, ref, time.perf_counter() - t0)
        if label == "fp8":  # the keys earlier results used
            gen.update(res)
        else:
            gen[label] = res
        print(f"[gen {label}] latent rel err {res['latent_rel_err']:.4f}, video PSNR {res['video_psnr_db']:.2f} dB "
              f"(bar 30), SSIM {res['video_ssim']:.4f}", flush=True)  # fmt: skip
    attention.set_self_attention_backend(None, DEV)
    del pipe
    release()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fp8_gpu.json")
    ap.add_argument("--skip", default="", help="comma list of: study, speed, generation")
    ap.add_argument(
        "--self-attention", default=None, help="also run the generation with this self-attention backend"
    )
    ap.add_argument(
        "--row-kernels", action="store_true", help="FP8 runs use kernels.rowquant (use_row_kernels)"
    )
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "attention_backend": attention.set_backend("auto", DEV)}  # fmt: skip
    t0 = time.perf_counter()
    parts = (("study", error_study), ("speed", speed),
             ("generation", lambda o: generation(o, args.self_attention, args.row_kernels)))  # fmt: skip
    for name, fn in parts:
        if name in skip:
            continue
        t = time.perf_counter()
        try:
            fn(out)
        except Exception as e:  # keep the other parts' results
            import traceback

            traceback.print_exc()
            out[f"{name}_error"] = repr(e)
        release()
        out.setdefault("section_seconds", {})[name] = time.perf_counter() - t
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
    out["total_seconds"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out} ({out['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
