"""GPU check of ``wanfast.accel``: each optimisation against the plain eager DiT (accuracy), and speed.

    PYTHONPATH=. python benchmarks/accel_gpu_check.py --out accel.json [--budget-s 330]

All models bf16 with random weights (``wanfast.tools.synthetic.random_dit``). Relative error is
||out - plain|| / ||plain|| over a CFG pair of two steps (four calls). For scale, ``floor_kernel_swap`` is
the error between two plain runs that differ only in the attention kernel (cuDNN vs flash).

1. tiny dims, latents [1, 16, 5, 24, 32]: plain, each optimisation alone, all (the default settings with
   compile on), all + CUDA graphs: error and median forward time; a 4-step two-expert ``denoise`` against
   plain; no recompile across steps after warm-up (``error_on_recompile``); host syncs inside the
   optimised forward (``torch.cuda.set_sync_debug_mode("warn")``, which warns on every synchronising call).
2. A14B dims (dim 5120, 40 blocks), small latents [1, 16, 3, 16, 16]: fuse, rope, cross_kv, cuda_graphs
   alone (compile is covered by 1 and 3; run here last, in section 5, if time remains).
3. A14B dims at 832x480x81 (latents [1, 16, 21, 60, 104], 32,760 tokens), one expert, optimisations added
   in order: plain -> fused -> +caches -> +compile (= default settings) -> +CUDA graphs: error, median
   time of one forward, first-call time (compile / capture), peak memory.
4. attention alone at 480p, q/k/v [1, 32760, 40, 128] bf16: every available backend, median ms, TFLOP/s.
5. (time permitting) A14B small latents: compile alone.

Writes JSON to --out and prints a compact table. Expected: ~4-5 min on an H200 (torch 2.11).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import subprocess
import time
import traceback
import warnings
from dataclasses import replace

import torch

from wanfast import attention
from wanfast.accel import each_alone, optimize_dit
from wanfast.accel.caches import cache_cross_kv, cache_rope, cache_time_embedding
from wanfast.accel.compile import compile_blocks
from wanfast.accel.fuse import fuse_projections
from wanfast.accel.graphs import CUDAGraphDiT
from wanfast.config import EngineSettings
from wanfast.pipeline import denoise
from wanfast.specs import SPECS, resolve_params
from wanfast.tools.synthetic import random_dit

BF16, DEV = torch.bfloat16, "cuda"
TINY_LATENT, SMALL_LATENT, LATENT_480P = (1, 16, 5, 24, 32), (1, 16, 3, 16, 16), (1, 16, 21, 60, 104)
ATTN_BLHD = (1, 32760, 40, 128)  # 480p self-attention of A14B: 21*30*52 tokens, 40 heads of 128
ALL = EngineSettings(device=DEV, dtype=BF16, compile=True)
PLAIN = ALL.plain()
ALONE = {
    **each_alone(ALL),  # fuse, rope, cross_kv, compile, cuda_graphs: one at a time
    "all": ALL,
    "all+cuda_graphs": replace(ALL, cuda_graphs=True),
}
T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def sync() -> None:
    torch.cuda.synchronize()


def median_s(fn, n: int, warmup: int = 0) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(preset, seed: int):
    return random_dit(preset, DEV, BF16, seed)


def make_inputs(cfg, shape, seed: int = 0):
    g = torch.Generator(DEV).manual_seed(seed)
    x = torch.randn(shape, device=DEV, generator=g)
    cond = [torch.randn(min(120, cfg.text_len), cfg.text_dim, device=DEV, generator=g)]
    uncond = [torch.randn(min(60, cfg.text_len // 2), cfg.text_dim, device=DEV, generator=g)]
    return x, cond, uncond


@torch.inference_mode()
def outputs(model, x, ctxs) -> list[torch.Tensor]:
    """Two steps, each a CFG pair (prompt, negative prompt) sharing one t tensor, as ``denoise`` calls."""
    outs = []
    for step in (999.0, 937.0):
        t = torch.full((1,), step, device=DEV)
        outs += [model(x, t, ctx).float() for ctx in ctxs]
    return outs


def max_err(outs, refs) -> float:
    return max(rel_err(a, b) for a, b in zip(outs, refs, strict=True))


def guarded(fn):
    """Run a case; an exception becomes {"error": ...} in the results instead of ending the run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - recorded, printed, and shown in the table
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def host_syncs(fn) -> list[str]:
    sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync()
    return [str(w.message)[:160] for w in caught if "synchroniz" in str(w.message).lower()]


# ---------------------------------------------------------------------------------------------- sections


def tiny_section() -> dict:
    preset = SPECS["tiny"]
    x, cond, uncond = make_inputs(preset.dit, TINY_LATENT)
    plain = build(preset, 1)
    refs = outputs(plain, x, (cond, uncond))
    t = torch.full((1,), 500.0, device=DEV)
    with torch.inference_mode():
        res = {"plain": {"median_ms": 1e3 * median_s(lambda: plain(x, t, cond), 20, warmup=3)}}
    for name, settings in ALONE.items():

        def case(settings=settings):
            model = optimize_dit(build(preset, 1), settings)
            t0 = time.perf_counter()
            outs = outputs(model, x, (cond, uncond))
            out = {"rel_err": max_err(outs, refs), "first_calls_s": time.perf_counter() - t0}
            with torch.inference_mode():
                out["median_ms"] = 1e3 * median_s(lambda: model(x, t, cond), 20, warmup=3)
            return out

        res[name] = guarded(case)
    res["denoise_4_steps"] = guarded(tiny_denoise)
    return res


def tiny_denoise() -> dict:
    preset = SPECS["tiny"]
    params = resolve_params(
        preset, "x", steps=4, shift=5.0, boundary=0.9, guidance_high_noise=4.0, guidance_low_noise=3.0
    )
    x, cond, uncond = make_inputs(preset.dit, TINY_LATENT, seed=3)
    plain = {n: build(preset, s) for n, s in (("high_noise", 1), ("low_noise", 2))}

    def run(experts, seed):
        noise = torch.randn(TINY_LATENT[1:], device=DEV, generator=torch.Generator(DEV).manual_seed(seed))
        with torch.inference_mode():
            return denoise(experts, noise, cond, uncond, params)[0]

    def experts(settings):
        return {n: optimize_dit(build(preset, s), settings)
                for n, s in (("high_noise", 1), ("low_noise", 2))}  # fmt: skip

    out, built = {}, {}
    for name in ("all", "all+cuda_graphs"):

        def case(name=name):
            fast = built[name] = experts(ALONE[name])
            warm = run(fast, 0)  # compiles / captures
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            with torch._dynamo.config.patch(error_on_recompile=True):
                later = run(fast, 1)  # new noise, same request shape: must not recompile
            return {
                "rel_err": max(rel_err(warm, run(plain, 0)), rel_err(later, run(plain, 1))),
                "no_recompile": torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs,
            }

        out[name] = guarded(case)
    eager = experts(replace(ALL, compile=False))
    run(eager, 0)  # warm: cuDNN plans, caches filled
    out["host_syncs_eager_optimised"] = host_syncs(lambda: run(eager, 1))
    if "all" in built:
        out["host_syncs_compiled"] = host_syncs(lambda: run(built["all"], 2))
    out["host_syncs_plain"] = host_syncs(lambda: run(plain, 1))
    return out


def a14b_small_section() -> dict:
    preset = SPECS["t2v-A14B"]
    x, cond, uncond = make_inputs(preset.dit, SMALL_LATENT)
    plain = build(preset, 1)
    refs = outputs(plain, x, (cond, uncond))
    chosen = attention.active_backend()
    attention.set_backend("sdpa-flash")
    res = {"floor_kernel_swap": {"rel_err": max_err(outputs(plain, x, (cond, uncond)), refs)}}
    attention.set_backend(chosen)
    del plain
    torch.cuda.empty_cache()
    for name in ("fuse", "rope", "cross_kv", "cuda_graphs"):

        def case(name=name):
            model = optimize_dit(build(preset, 1), ALONE[name])
            return {"rel_err": max_err(outputs(model, x, (cond, uncond)), refs)}

        res[name] = guarded(case)
        torch.cuda.empty_cache()
    return res, (x, cond, uncond, refs)


def a14b_compile_alone(saved) -> dict:
    x, cond, uncond, refs = saved
    model = optimize_dit(build(SPECS["t2v-A14B"], 1), ALONE["compile"])
    return {"rel_err": max_err(outputs(model, x, (cond, uncond)), refs)}


def ladder_section(repeats: int) -> dict:
    """One A14B expert at 480p; each rung adds an optimisation to the same model."""
    preset = SPECS["t2v-A14B"]
    x, cond, uncond = make_inputs(preset.dit, LATENT_480P)
    model = build(preset, 1)
    t = torch.full((1,), 999.0, device=DEV)
    refs, rungs = None, {}

    def fuse(m):
        fuse_projections(m)
        return m

    def add_caches(m):
        cache_rope(m)
        cache_cross_kv(m)
        cache_time_embedding(m)
        return m

    def add_compile(m):
        compile_blocks(m)
        return m

    steps = [
        ("plain", lambda m: m),
        ("fused", fuse),
        ("fused+caches", add_caches),
        ("fused+caches+compile", add_compile),  # = the default EngineSettings on CUDA
        ("+cuda_graphs", CUDAGraphDiT),  # disables the caches: the graph replays their work
    ]
    for name, apply in steps:

        def rung(apply=apply):
            nonlocal model, refs
            model = apply(model)
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                t0 = time.perf_counter()
                outs = [model(x, t, cond).float()]
                sync()
                first = time.perf_counter() - t0
                graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                with torch._dynamo.config.patch(error_on_recompile=True):
                    outs.append(model(x, t, uncond).float())
                    t2 = torch.full((1,), 937.0, device=DEV)
                    outs.append(model(x, t2, cond).float())
                    sec = median_s(lambda: model(x, t2, cond), repeats)
            out = {"median_s": sec, "first_call_s": first,
                   "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
                   "no_recompile": torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs}  # fmt: skip
            if refs is None:
                refs = outs
            out["rel_err"] = max_err(outs, refs)
            return out

        rungs[name] = guarded(rung)
    return rungs


def attention_section() -> dict:
    B, L, H, D = ATTN_BLHD
    g = torch.Generator(DEV).manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device=DEV, dtype=BF16, generator=g) for _ in range(3))
    flops = 4 * B * H * L * L * D
    res, ref = {}, None
    for name, backend in attention._REGISTRY.items():
        if name == "sdpa-math":
            continue  # materialises [H, L, L] scores: 171 GB at this size
        if not backend.available():
            res[name] = {"available": False}
            continue

        def case(backend=backend):
            nonlocal ref
            fn = backend.factory()
            with torch.inference_mode():
                sec = median_s(lambda: fn(q, k, v), 10, warmup=3)
                out = fn(q, k, v).float()
            ref = out if ref is None else ref
            return {"ms": 1e3 * sec, "TFLOP/s": flops / sec / 1e12, "rel_err_vs_first": rel_err(out, ref),
                    "lossy": backend.lossy}  # fmt: skip

        res[name] = guarded(case)
    return res


# ---------------------------------------------------------------------------------------------- report


def table(results: dict) -> str:
    rows = [("section", "case", "rel_err", "time", "notes")]
    for section in ("tiny", "a14b_small", "a14b_480p", "attention_480p"):
        for case, r in results.get(section, {}).items():
            if not isinstance(r, dict):
                continue
            if "error" in r:
                rows.append((section, case, "-", "-", "ERROR " + r["error"][:60]))
                continue
            err = f"{r['rel_err']:.2e}" if "rel_err" in r else "-"
            if "median_s" in r:
                tm = f"{r['median_s']:.3f} s"
            elif "median_ms" in r:
                tm = f"{r['median_ms']:.2f} ms"
            elif "ms" in r:
                tm = f"{r['ms']:.2f} ms"
            else:
                tm = "-"
            notes = []
            if "TFLOP/s" in r:
                notes.append(f"{r['TFLOP/s']:.0f} TFLOP/s")
            if "first_call_s" in r:
                notes.append(f"first {r['first_call_s']:.1f} s")
            if "peak_GiB" in r:
                notes.append(f"peak {r['peak_GiB']:.1f} GiB")
            if r.get("no_recompile") is False:
                notes.append("RECOMPILED")
            if r.get("available") is False:
                notes.append("not available")
            for key in ("host_syncs_eager_optimised", "host_syncs_compiled", "host_syncs_plain"):
                if key in r:
                    notes.append(f"{key.removeprefix('host_syncs_')} syncs {len(r[key])}")
            for key in ("all", "all+cuda_graphs"):
                if isinstance(r.get(key), dict) and "rel_err" in r[key]:
                    notes.append(f"{key} {r[key]['rel_err']:.1e} no_recompile={r[key]['no_recompile']}")
                elif isinstance(r.get(key), dict):
                    notes.append(f"{key} ERROR")
            rows.append((section, case, err, tm, ", ".join(notes)))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths + [0], strict=True)) for row in rows
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=300.0, help="the optional case needs 60 s of it left")
    ap.add_argument("--repeats", type=int, default=3, help="timed 480p forwards per rung")
    args = ap.parse_args()
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # noqa: BLE001
        commit = "unknown"
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "not installed"

    results = {
        "what": "wanfast.accel: accuracy vs plain eager DiT and forward time, random bf16 weights",
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton,
        "commit": commit, "attention_backend": attention.set_backend("auto", DEV),
    }  # fmt: skip
    results["tiny"] = tiny_section()
    print(f"[{elapsed():.0f} s] tiny done", flush=True)
    small, saved = a14b_small_section()
    results["a14b_small"] = small
    print(f"[{elapsed():.0f} s] A14B small done", flush=True)
    results["a14b_480p"] = ladder_section(args.repeats)
    print(f"[{elapsed():.0f} s] A14B 480p ladder done", flush=True)
    results["attention_480p"] = attention_section()
    if elapsed() < args.budget_s - 60:
        results["a14b_small"]["compile"] = guarded(lambda: a14b_compile_alone(saved))
    else:
        results["a14b_small"]["compile"] = {"error": f"skipped: {elapsed():.0f} s used of {args.budget_s} s"}
    results["total_s"] = elapsed()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))
    print(
        f"total {results['total_s']:.0f} s; attention backend {results['attention_backend']}; -> {args.out}"
    )


if __name__ == "__main__":
    main()
