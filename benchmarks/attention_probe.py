"""Self-attention kernels at the DiT's real sizes: which one is fastest on this GPU, and do they agree?

    python benchmarks/attention_probe.py --out attention.json

Shapes: [1, L, 40, 128] bf16 (A14B: 40 heads of 128), L = 32,760 (832x480x81) and 75,600 (1280x720x81).
Backends: torch SDPA with cuDNN, flash and efficient kernels, and FlashAttention-3 (``flash_attn_interface``
or the forward-only ``fa3_fwd_interface`` wheel) when importable. Output relative to the math of SDPA-cuDNN.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def sdpa(backend):
    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)

    return fn


def fa3():
    for mod in ("flash_attn_interface", "fa3_fwd_interface"):
        try:
            m = __import__(mod)
        except Exception as e:  # report why, keep probing
            print(f"{mod}: not importable: {type(e).__name__}: {e}")
            continue

        def fn(q, k, v, m=m):
            out = m.flash_attn_func(q, k, v)
            return out[0] if isinstance(out, tuple) else out

        return mod, fn
    return None, None


def bench(fn, q, k, v, reps: int = 5) -> float:
    fn(q, k, v)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(q, k, v)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    backends = {
        "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }
    name, fn = fa3()
    if fn is not None:
        backends[f"fa3 ({name})"] = fn
    res = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    for L in (32760, 75600):
        g = torch.Generator("cuda").manual_seed(0)
        q, k, v = (
            torch.randn(1, L, 40, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)
        )
        flops = 4 * L * L * 128 * 40
        ref = backends["sdpa-cudnn"](q, k, v).float()
        for bname, f in backends.items():
            try:
                ms = bench(f, q, k, v)
                err = ((f(q, k, v).float() - ref).norm() / ref.norm()).item()
                res[f"{bname}@{L}"] = {
                    "ms": round(ms, 2),
                    "tflops": round(flops / ms / 1e9, 1),
                    "rel_err": err,
                }
            except Exception as e:
                res[f"{bname}@{L}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(bname, L, res[f"{bname}@{L}"], flush=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
