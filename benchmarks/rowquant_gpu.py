"""The one-pass FP8 row-quantisation kernel (wanfast/kernels/rowquant.py) vs torch ops, on the GPU.

    PYTHONPATH=. python3 benchmarks/rowquant_gpu.py --out rowquant.json

For the inputs the fast mode quantises at 1280x720x81 (75,600 tokens) and 832x480x81 (32,760): the FFN's
pre-activation [L, 13,824] (GELU-tanh then row quantisation: ``ffn.2``'s operand) and an attention output
[L, 5,120] (``self_attn.o`` / ``cross_attn.o``'s operand). Times (CUDA events, median of 20) of
- ``eager``: ``accel.fp8.quantize_rows`` (after ``nn.GELU``) as separate torch kernels;
- ``compiled``: the same ops under torch.compile (inductor's fusion, what a compiled block ran before);
- ``kernel``: ``kernels.rowquant.rowquant``;
with the effective bandwidth (one read of x, one write of x8) and the kernel's agreement with eager:
scales' max relative difference, share of e4m3 values that differ, and the largest difference in e4m3
steps (GELU rounding may move a value by one step).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
import torch.nn.functional as F
from attn8_gpu import timed

from wanfast.accel.fp8 import quantize_rows
from wanfast.kernels.rowquant import rowquant

CASES = [("ffn.2 gelu 720p", 75600, 13824, True), ("attn.o 720p", 75600, 5120, False),
         ("ffn.2 gelu 480p", 32760, 13824, True), ("attn.o 480p", 32760, 5120, False)]  # fmt: skip


def torch_ops(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rows(F.gelu(x, approximate="tanh") if gelu else x)


def agreement(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> dict:
    (y, s), (yr, sr) = a, b
    yf, yrf = y.float(), yr.float()
    differ = yf != yrf
    # one e4m3 step at |v| is 2^(floor(log2 |v|) - 3) (3 mantissa bits); subnormals: 2^-9
    step = torch.exp2(torch.floor(torch.log2(yrf.abs().clamp(min=2**-6))) - 3)
    return {"scale_max_rel_diff": ((s - sr).abs() / sr).max().item(), "values_differing": differ.float().mean().item(),
            "max_diff_in_steps": ((yf - yrf).abs() / step).max().item()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "cases": {}}  # fmt: skip
    compiled = torch.compile(torch_ops, dynamic=False)
    g = torch.Generator("cuda").manual_seed(0)
    for name, rows, cols, gelu in CASES:
        x = (torch.randn(rows, cols, device="cuda", generator=g) * 2).bfloat16()
        byte_count = x.numel() * 3  # read bf16 (2 B), write e4m3 (1 B); scales are negligible
        row = {"shape": [rows, cols], "gelu": gelu}
        with torch.inference_mode():
            for label, fn in (("eager", torch_ops), ("compiled", compiled), ("kernel", rowquant)):
                t = timed(partial(fn, x, gelu), reps=20)
                row[label] = {**t, "GB_per_s": round(byte_count / t["median_s"] / 1e9, 1)}
            row["kernel_vs_eager"] = agreement(rowquant(x, gelu), torch_ops(x, gelu))
            row["compiled_vs_eager"] = agreement(compiled(x, gelu), torch_ops(x, gelu))
        row["kernel_speedup_vs_compiled"] = round(row["compiled"]["median_s"] / row["kernel"]["median_s"], 3)
        res["cases"][name] = row
        print(name, {k: row[k]["median_s"] * 1e3 for k in ("eager", "compiled", "kernel")}, "ms;",
              row["kernel_vs_eager"], flush=True)  # fmt: skip
        x = None  # free the input before the next case's
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
