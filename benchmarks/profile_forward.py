"""Where one compiled DiT forward spends its GPU time, by kernel category (issue #4: the 720p fast mode).

    PYTHONPATH=/tmp/site:. python3 benchmarks/profile_forward.py --out prof.json --size 1280x720 \\
        --variant fp8+fa3-fp8 [--variant bf16 ...]

For each variant (``bf16``: EngineSettings() defaults; ``fp8``: + --quant fp8; ``fp8+NAME``: + the
self-attention backend NAME), on A14B dims with random weights and 81 frames: build and optimise one
expert as ``wanfast bench`` does, warm up (compiles), time 2 forwards with CUDA events, then profile one
forward with torch.profiler and sum the device time of every kernel by category:

- ``self_attention`` / ``cross_attention``: attention kernels (flash / fmha / cudnn / attn8), split by the
  call order inside a block (self first, then cross: each block launches them alternately);
- ``gemm``: cuBLAS / CUTLASS / nvjet kernels and ``_scaled_mm``;
- ``fused_elementwise``: inductor's ``triton_*`` kernels (norms, modulation, RoPE, gates, FP8 quantisation);
- ``other``: everything else (copies, reductions outside the compiled blocks).

Writes per variant: the forward time, each category's total and share, and the 25 costliest kernels.
Random weights: kernel times do not depend on weight values.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import time
from dataclasses import replace

import torch

from wanfast.config import EngineSettings
from wanfast.specs import SPECS, resolve_params
from wanfast.tools.bench_peer import Clock, WanfastSide, make_inputs

ATTENTION = re.compile(r"flash|fmha|attn|sdpa|attention", re.I)  # FA2/FA3, cuDNN SDPA, wanfast's attn8
GEMM = re.compile(r"gemm|cutlass|nvjet|scaled_mm|xmma|cublas", re.I)


def category(name: str) -> str:
    """Inductor's kernels first (their names come from fused aten ops), then attention (FA3's names also
    carry cutlass types), then GEMMs."""
    if name.startswith("triton_"):
        return "fused_elementwise"
    if ATTENTION.search(name):
        return "attention"
    if GEMM.search(name):
        return "gemm"
    return "other"


def settings_of(variant: str) -> EngineSettings:
    base = EngineSettings(device="cuda", dtype=torch.bfloat16)
    if variant == "bf16":
        return base
    if variant == "fp8":
        return replace(base, quant="fp8")
    if variant.startswith("fp8+"):
        return replace(base, quant="fp8", self_attention_backend=variant[4:])
    raise SystemExit(f"unknown variant {variant!r}: bf16, fp8 or fp8+BACKEND")


def kernel_table(prof) -> list[tuple[str, float, int]]:
    """(kernel name, device seconds, calls) for every device kernel, in launch order per name."""
    rows = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            t, n = rows.get(evt.name, (0.0, 0))
            rows[evt.name] = (t + evt.device_time_total / 1e6, n + 1)  # device_time_total in us
    return sorted(((k, t, n) for k, (t, n) in rows.items()), key=lambda r: -r[1])


def attention_split(prof) -> dict[str, float]:
    """Attention kernels alternate self, cross within each block: sum the even and odd launches."""
    launches = sorted(
        (
            e
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and category(e.name) == "attention"
        ),
        key=lambda e: e.time_range.start,
    )
    out = {"self_attention": 0.0, "cross_attention": 0.0}
    for i, e in enumerate(launches):
        out["self_attention" if i % 2 == 0 else "cross_attention"] += e.device_time_total / 1e6
    out["attention_launches"] = len(launches)
    return out


@torch.inference_mode()
def profile_variant(variant: str, size: tuple[int, int], frames: int) -> dict:
    preset = SPECS["t2v-A14B"]
    settings = settings_of(variant)
    side = WanfastSide(preset, torch.device("cuda"), torch.bfloat16, torch.bfloat16, 0)
    t0 = time.perf_counter()
    dit = side.build_dit(settings)
    params = resolve_params(preset, "a fox", width=size[0], height=size[1], frames=frames)
    inp = make_inputs(preset, params, torch.device("cuda"), torch.bfloat16)
    fwd = side.forward(dit, inp)
    fwd()  # compiles
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    times = [Clock(torch.device("cuda")).once(fwd) for _ in range(2)]  # CUDA events, as wanfast bench
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fwd()
        torch.cuda.synchronize()
    table = kernel_table(prof)
    totals: dict[str, float] = {}
    for name, t, _ in table:
        totals[category(name)] = totals.get(category(name), 0.0) + t
    device_total = sum(totals.values())
    res = {
        "variant": variant, "size": f"{size[0]}x{size[1]}", "frames": frames, "build_and_compile_s": build_s,
        "forward_s": times, "device_total_s": device_total, "by_category_s": totals,
        "by_category_share": {k: v / device_total for k, v in totals.items()},
        "attention_split_s": attention_split(prof),
        "top_kernels": [{"name": n[:200], "seconds": t, "calls": c, "category": category(n)} for n, t, c in table[:25]],
    }  # fmt: skip
    print(f"[{variant}] forward {min(times):.3f} s; " + ", ".join(f"{k} {v:.3f} s" for k, v in totals.items()),
          flush=True)  # fmt: skip
    del dit, fwd
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--variant", action="append", default=None)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    for variant in args.variant or ["fp8+fa3-fp8"]:
        try:
            report["runs"].append(profile_variant(variant, (w, h), args.frames))
        except Exception as e:  # keep the other variants' results
            import traceback

            traceback.print_exc()
            report["runs"].append({"variant": variant, "error": repr(e)})
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
