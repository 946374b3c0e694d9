"""Time to switch the LoRA set of a served model between jobs (issue 19): random-weight experts at the real
dimensions (default A14B, both experts resident, q/k/v fused as served), two random rank-64 LoRA files
covering every block Linear of both experts, switched none -> A -> B -> none, twice, with the base copies
on the device and in pinned host memory (``accel/lora_switch.py``). Target: <= 2 s a switch.

    python benchmarks/lora_switch_gpu.py                  # JSON to $OUT/lora_switch.json (or --out)
    python benchmarks/lora_switch_gpu.py --model tiny --device cpu --out x.json   # the logic, on a CPU

Also checks, per placement: switching back to none gives the plain weights bit for bit, and the second
none -> A gives the same bits as the first (the switch is a pure function of base and set).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from wanfast.accel import optimize_dit
from wanfast.accel.lora_switch import enable_lora_switching, live_tensor, switch_loras
from wanfast.config import EngineSettings
from wanfast.loading.lora import read_lora
from wanfast.specs import SPECS
from wanfast.tools.lora_testing import write_random_lora
from wanfast.tools.synthetic import random_dit


def _build(spec, device: str, dtype: torch.dtype):
    """The experts as a worker serves them (fused q/k/v; no caches or compile: neither touches weights),
    without text encoder and VAE, which a switch never touches."""
    settings = EngineSettings(
        device=device, dtype=dtype, compile=False, cache_cross_kv=False, cache_rope=False
    )
    experts = {
        n: optimize_dit(random_dit(spec, device, dtype, seed=i + 1), settings)
        for i, n in enumerate(spec.experts)
    }
    return SimpleNamespace(experts=experts, device=torch.device(device), spec=spec)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _probe(pipe, params: list[str]) -> list[torch.Tensor]:
    return [live_tensor(d, p).detach().clone() for d in pipe.experts.values() for p in params]


def run_placement(pipe, files, placement: str, device: str) -> dict:
    t0 = time.perf_counter()
    sw = enable_lora_switching(pipe, files, placement=placement)
    _sync(device)
    setup = time.perf_counter() - t0
    spec, (a, b) = pipe.spec, files
    probe = [
        "blocks.0.self_attn.q.weight",
        f"blocks.{spec.dit.num_layers - 1}.ffn.2.weight",
        "blocks.0.cross_attn.v.weight",
    ]
    plain = _probe(pipe, probe)
    sets = {"none->A": [(a, 3.0, 1.5)], "A->B": [(b, 1.0, 1.0)], "B->none": []}
    rounds, first_a = [], None
    for _ in range(2):
        times = {}
        for name, stack in sets.items():
            times[name] = round(switch_loras(pipe, stack), 4)
            if name == "none->A":
                now = _probe(pipe, probe)
                same = first_a is None or all(torch.equal(x, y) for x, y in zip(now, first_a, strict=True))
                first_a = first_a or now
                times["A_same_as_first"] = same
        times["none_equals_plain"] = all(
            torch.equal(x, y) for x, y in zip(_probe(pipe, probe), plain, strict=True)
        )
        rounds.append(times)
    nbytes = sum(t.numel() * t.element_size() for e in sw.experts.values() for t in e.bases.values())
    out = {
        "placement": sw.placement,
        "setup_s": round(setup, 3),
        "base_bytes": nbytes,
        "rounds": rounds,
    }
    out["max_switch_s"] = max(v for r in rounds for k, v in r.items() if "->" in k)
    for e in sw.experts.values():
        e.bases = {}
    pipe.lora_switcher = None
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        out["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="t2v-A14B")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--placements", default="device,host", help="comma list of device, host")
    ap.add_argument("--out", default=None, help="JSON path (default: $OUT/lora_switch.json)")
    args = ap.parse_args()
    out_path = Path(args.out or Path(os.environ.get("OUT", ".")) / "lora_switch.json")
    spec = SPECS[args.model]
    dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    res = {"model": args.model, "device": args.device, "rank": args.rank, "dtype": str(dtype), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "target_s": 2.0}  # fmt: skip
    if torch.device(args.device).type == "cuda":
        res["gpu"] = torch.cuda.get_device_name()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = [
            write_random_lora(Path(tmp) / f"{n}.safetensors", spec.dit, args.rank, seed)
            for n, seed in (("a", 1), ("b", 2))
        ]
        files = [read_lora(p) for p in paths]
        res["lora_file_MB"] = round(os.path.getsize(paths[0]) / 1e6, 1)
        res["lora_targets"] = len(files[0].targets())
        res["write_read_loras_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    pipe = _build(spec, args.device, dtype)
    _sync(args.device)
    res["build_s"] = round(time.perf_counter() - t0, 2)
    res["results"] = {}
    for placement in args.placements.split(","):
        try:
            res["results"][placement] = run_placement(pipe, files, placement, args.device)
        except Exception as e:  # e.g. no room for device bases: record it, measure the other placement
            res["results"][placement] = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(res["results"][placement]), flush=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
