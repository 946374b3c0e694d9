"""VAE decode at real Wan2.1 dimensions: ours (plain fp32, plain bf16, each wanfast.accel.vae option alone
and all together, bf16) against Diffusers' AutoencoderKLWan (bf16), all with the same random weights.

    python benchmarks/vae_gpu_bench.py --out vae_bench.json [--sizes 720p,480p] [--variants a,b,...]
        [--repeats 3] [--budget-s 300] [--device cuda]

Latents [1, 16, 21, h, w] (81 frames; 720p: h, w = 90, 160; 480p: 60, 104) ~ N(0, 1), normalised as the
DiT makes them; Diffusers gets them un-normalised (z * std + mean). Every config builds a fresh model (one
on the GPU at a time, so peaks compare), runs 1 warm-up decode (cuDNN autotuning and compiles land there),
then ``--repeats`` timed decodes (synchronize + perf_counter; the median is reported). Peak memory is
torch.cuda.max_memory_allocated over the timed decodes, weights, latents and output included. Errors are
relative L2 norms against ours plain fp32 (cuDNN's default TF32 on; Diffusers also against ours plain
bf16), so ours_fp32 must be in the same run. Work goes in priority groups, each over all sizes: baselines,
"all" and "all_split"; then each option alone; then the torch.compile variants (slow warm-ups). Configs
that would start after ``--budget-s`` seconds are recorded as skipped: the default run takes ~5.5 min on
an H200 and usually skips the 480p single options and the compile variants (rerun those with --sizes /
--variants). The JSON is rewritten after every config; a compact table is printed last.
``--device cpu --sizes smoke --preset tiny`` runs the whole script small, to check it without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
import traceback
from collections import Counter
from dataclasses import asdict, replace

import torch
import torch._dynamo  # reset() after the torch.compile variants
from torch.utils._python_dispatch import TorchDispatchMode

from wanfast.accel.vae import VAEDecodeOptions, optimize_vae
from wanfast.config import EngineSettings
from wanfast.loading import vae_keys
from wanfast.specs import SPECS
from wanfast.tools.synthetic import random_vae

PRESET = SPECS["t2v-A14B"]  # --preset replaces it
SEED = 4
SIZES = {"720p": (21, 90, 160), "480p": (21, 60, 104), "smoke": (3, 4, 6)}  # latent (frames, h, w)
BASELINES = ("ours_fp32", "ours_bf16", "diffusers_bf16")
_ALL, _off = VAEDecodeOptions(), VAEDecodeOptions.off
VARIANTS = {  # bf16
    "all": _ALL,
    "all_split": replace(_ALL, conv2d_split=True),
    "cudnn_benchmark": _off(cudnn_benchmark=True),
    "channels_last": _off(channels_last=True),
    "causal_conv": _off(causal_conv=True),
    "conv2d_split": _off(causal_conv=True, channels_last=True, conv2d_split=True),
    "subpixel_upsample": _off(subpixel_upsample=True),
    "fused_norm": _off(fused_norm="triton"),
    "prealloc_output": _off(prealloc_output=True),
    "fused_norm_compile": _off(fused_norm="compile"),
    "all_compile": replace(_ALL, fused_norm="compile"),
}
_COMPILED = ("fused_norm_compile", "all_compile")
GROUPS = [
    (*BASELINES, "all", "all_split"),
    tuple(n for n in VARIANTS if n not in (*_COMPILED, "all", "all_split")),
    _COMPILED,
]
COPIES = {"aten.clone", "aten.copy_", "aten.cat", "aten.constant_pad_nd", "aten.contiguous"}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def diffusers_vae(device: str):
    """AutoencoderKLWan (bf16) holding ours' random weights, through the official -> Diffusers key map."""
    from diffusers import AutoencoderKLWan

    kwargs = vae_keys.diffusers_config_json(PRESET.vae)
    kwargs.pop("_class_name")
    with torch.device("meta"):
        ref = AutoencoderKLWan(**kwargs)
    ref = ref.to_empty(device=device).to(torch.bfloat16)
    ours = random_vae(PRESET, device, torch.bfloat16, SEED)
    ref.load_state_dict(vae_keys.official_to_diffusers(ours.state_dict()), strict=True)
    return ref.eval().requires_grad_(False)


def build(name: str, device: str):
    """(model, decode(latents) -> video) for one config."""
    if name == "diffusers_bf16":
        ref = diffusers_vae(device)
        mean = torch.tensor(PRESET.vae.latents_mean, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(PRESET.vae.latents_std, device=device).view(1, -1, 1, 1, 1)
        return ref, lambda z: ref.decode((z.float() * std + mean).to(torch.bfloat16), return_dict=False)[0]
    dtype = torch.float32 if name == "ours_fp32" else torch.bfloat16
    vae = random_vae(PRESET, device, dtype, SEED)
    if name in VARIANTS:
        vae = optimize_vae(vae, EngineSettings(device=device), **asdict(VARIANTS[name]))
    return vae, lambda z: vae.decode(z.to(dtype))  # in the VAE dtype, as the pipeline hands them over


def measure(decode, z: torch.Tensor, repeats: int, device: str) -> tuple[torch.Tensor, dict]:
    sync(device)
    t = time.perf_counter()
    out = decode(z)
    sync(device)
    warmup = time.perf_counter() - t
    del out
    free(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device == "cuda" else 0
    times, out = [], None
    for _ in range(repeats):
        out = None  # the previous output is not part of this decode's peak
        sync(device)
        t = time.perf_counter()
        out = decode(z)
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    rec = {"warmup_s": round(warmup, 3), "times_s": [round(x, 4) for x in times],
           "median_s": round(statistics.median(times), 4), "peak_GB": round(peak / 1e9, 3),
           "base_GB": round(base / 1e9, 3), "peak_over_base_GB": round((peak - base) / 1e9, 3)}  # fmt: skip
    return out, rec


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, ref on the CPU, a few frames at a time on out's device."""
    num = den = 0.0
    for i in range(0, out.shape[2], 8):
        a = out[:, :, i : i + 8].double()
        b = ref[:, :, i : i + 8].to(out.device, torch.float64)
        num += (a - b).square().sum().item()
        den += b.square().sum().item()
    return (num / den) ** 0.5


class _Audit(TorchDispatchMode):
    """Counts copy ops and the memory formats conv inputs / outputs come in."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name in COPIES:
            self.counts[name] += 1
        elif name in ("aten.convolution", "aten.conv2d", "aten.conv3d"):  # conv3d/2d: in inference mode
            fmt = {True: "NDHWC/NHWC", False: "other"}
            for tag, t in (("in", args[0]), ("out", out)):
                cl = torch.channels_last_3d if t.ndim == 5 else torch.channels_last
                self.counts[f"conv_{tag}_{fmt[t.is_contiguous(memory_format=cl)]}"] += 1
        return out


def audit(vae, device: str) -> dict:
    """Ops of one small decode (3 latent frames, 16x24): copies and conv layouts."""
    mode = _Audit()
    z = torch.randn(1, 16, 3, 2, 3, device=device, dtype=vae.dtype)
    with mode:
        vae.decode(z)
    return dict(sorted(mode.counts.items()))


def run_config(name: str, z: torch.Tensor, refs: dict, args) -> dict:
    rec: dict = {"config": name}
    if name in VARIANTS:
        rec["options"] = asdict(VARIANTS[name])
    model = out = None
    try:
        model, decode = build(name, args.device)
        out, timing = measure(decode, z, args.repeats, args.device)
        rec.update(timing)
        rec["finite"] = bool(torch.isfinite(out).all())
        if name == "ours_fp32":
            rec["saturated_frac"] = round((out.abs() >= 0.999).float().mean().item(), 4)
            rec["std"] = round(out.float().std().item(), 4)
            refs["fp32"] = out.cpu()
        elif "fp32" in refs:
            rec["err_vs_ours_fp32"] = rel_err(out, refs["fp32"])
        if name == "ours_bf16":
            refs["bf16"] = out.to(torch.bfloat16).cpu()  # exact: its values are bf16 already
        if name == "diffusers_bf16" and "bf16" in refs:
            rec["err_vs_ours_bf16"] = rel_err(out, refs["bf16"])
        if name in ("all", "all_split"):
            out = None
            rec["audit_small_decode"] = audit(model, args.device)
    except Exception as e:  # one failing variant must not cost the others
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
        rec["traceback"] = traceback.format_exc()[-3000:]
        print(rec["traceback"], flush=True)
    del model, out
    if "compile" in name:
        torch._dynamo.reset()  # drop graphs (and the weights their guards hold)
    free(args.device)
    return rec


def table(records: list[dict]) -> str:
    rows = [f"{'size':6} {'config':20} {'median_s':>9} {'x_diff':>7} {'peak_GB':>8} {'err_fp32':>9}  note"]
    diff = {r["size"]: r.get("median_s") for r in records if r["config"] == "diffusers_bf16"}
    for r in records:
        ratio = r.get("median_s", 0) / diff[r["size"]] if diff.get(r["size"]) and "median_s" in r else None
        err = r.get("err_vs_ours_fp32")
        note = r.get("error", "")[:60] or ("skipped" if r.get("skipped") else "")
        if r["config"] == "diffusers_bf16" and "err_vs_ours_bf16" in r:
            note = f"err vs ours bf16 {r['err_vs_ours_bf16']:.2e}"
        rows.append(
            f"{r['size']:6} {r['config']:20} {r.get('median_s', float('nan')):9.3f} "
            f"{ratio if ratio is not None else float('nan'):7.3f} {r.get('peak_GB', float('nan')):8.2f} "
            f"{err if err is not None else float('nan'):9.2e}  {note}"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="720p,480p", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--variants", default="all", help="comma list of baselines / variants, or 'all'")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no config after this many seconds")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="t2v-A14B", help="whose VAE config (tiny: for --device cpu checks)")
    args = ap.parse_args()
    global PRESET
    PRESET = SPECS[args.preset]
    known = (*BASELINES, *VARIANTS)
    names = known if args.variants == "all" else tuple(args.variants.split(","))
    sizes = args.sizes.split(",")
    unknown = [n for n in names if n not in known] + [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown sizes / configs {unknown}; configs: {', '.join(known)}")
    # Priority groups, each over all sizes: what the target needs first, torch.compile (slow warm-ups) last.
    work = [(size, n) for group in GROUPS for size in sizes for n in group if n in names]

    start = time.perf_counter()
    meta = {
        "what": "Wan2.1 VAE decode, random weights, real dims; ours vs Diffusers AutoencoderKLWan",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if args.device == "cuda" else None,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "repeats": args.repeats,
        "vae_config": asdict(PRESET.vae),
    }
    try:
        import diffusers
        import triton

        meta.update(diffusers=diffusers.__version__, triton=triton.__version__)
    except ImportError as e:
        meta["import_error"] = str(e)
    records: list[dict] = []
    refs: dict[str, dict] = {size: {} for size in sizes}  # per size: ours fp32 / bf16 outputs, on the CPU
    with torch.inference_mode():
        for size, name in work:
            f, h, w = SIZES[size]
            gen = torch.Generator(args.device).manual_seed(0)
            z = torch.randn(1, PRESET.vae.z_dim, f, h, w, generator=gen, device=args.device)
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                rec = {"config": name, "skipped": True}
            else:
                print(f"[{elapsed:6.1f} s] {size} {name} ...", flush=True)
                rec = run_config(name, z, refs[size], args)
                print(f"    {json.dumps({k: v for k, v in rec.items() if k != 'traceback'})}", flush=True)
            records.append({"size": size, "latents": list(z.shape), **rec})
            del z
            with open(args.out, "w") as fh:
                json.dump({**meta, "total_s": round(time.perf_counter() - start, 1), "records": records},
                          fh, indent=1)  # fmt: skip
    records.sort(key=lambda r: (sizes.index(r["size"]), known.index(r["config"])))
    print(table(records))


if __name__ == "__main__":
    main()
