"""Helpers of benchmarks/coldstart_gpu.sh (issue #17, cold start), each a subcommand:

    write   real-size random-weight checkpoint parts in the official layout, shard by shard (random tensors
            made on --device, one shard in host memory at a time): --what rest (UMT5 .pth, VAE .pth,
            tokenizer), fp8 (both experts as `wanfast quantize` writes them), bf16 (both bf16 experts: the
            whole set, for the 128 GiB disk of nvidia-h200-x2), bf16-expert (one bf16 expert
            folder; with --link-low the low-noise folder is a link to it, so one process reads the same
            files twice: once as they are on disk, once from the page cache)
    dd      the sequential read rate of files (dd to /dev/null, 16 MiB blocks, one file after the other)
    h2d     host -> device copy rate: pinned and pageable sources, one big copy
    serve   a fresh `wanfast serve` from start to /health 200 with its --warm-sizes warm (the readiness a
            load balancer sees), polled every 0.1 s; the server is stopped after
    summary all the JSON of a run in one file, each load stated against the dd rate of its bytes

The weights are random (timing only). The FP8 experts hold e4m3 weights with per-output-channel scales
and the marker in config.json, exactly the keys `wanfast quantize` writes (tests/test_coldstart.py loads
the tiny-spec output of every part through the normal loaders).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch

from wanfast.specs import get_spec

SHARD_BYTES = 5 * 10**9  # as the published A14B folders (~5 GB per shard)
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
DIT = "diffusion_pytorch_model"
_DIRS = {"high_noise": "high_noise_model", "low_noise": "low_noise_model", "dit": ""}


def _random(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str, gen) -> torch.Tensor:
    """Finite values of a plausible scale: norm weights 1, biases small, matrices ~ 1/sqrt(fan_in)."""
    if len(shape) == 1 and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    fan_in = max(1, int(torch.tensor(shape[1:]).prod().item())) if len(shape) > 1 else 50
    t = torch.randn(shape, device=device, generator=gen, dtype=torch.float32) * fan_in**-0.5
    return t.to(dtype)


def _meta_state_dict(module_fn) -> dict[str, torch.Tensor]:
    """The state dict of ``module_fn()`` built on the meta device: keys and shapes, no memory."""
    with torch.device("meta"):
        return dict(module_fn().state_dict())


def write_shards(folder: Path, specs: dict, device: str, seed: int) -> int:
    """``specs``: key -> (shape, dtype, maker) with maker(key, shape, gen) -> tensor on ``device``.
    Sharded safetensors + index (or one file), one shard in memory at a time. Returns bytes written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shards, size = [[]], 0
    for key in sorted(specs):
        shape, dtype, _ = specs[key]
        n = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    gen = torch.Generator(device).manual_seed(seed)
    names, weight_map, total = [], {}, 0
    for i, keys in enumerate(shards):
        name = (
            f"{DIT}.safetensors"
            if len(shards) == 1
            else f"{DIT}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        part = {k: specs[k][2](k, specs[k][0], gen).to("cpu").contiguous() for k in keys}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map.update(dict.fromkeys(keys, name))
        names.append(name)
        del part
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{DIT}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def dit_specs(cfg, device: str, fp8: bool) -> dict:
    """The official keys of one expert: bf16 tensors, or (``fp8``) what ``fp8_state_dict`` saves."""
    from wanfast.accel.fp8 import DEFAULT_POLICY, FP8
    from wanfast.models.dit import WanDiT

    specs = {}
    for key, t in _meta_state_dict(lambda: WanDiT(cfg)).items():
        shape = tuple(t.shape)
        module, _, leaf = key.rpartition(".")
        if fp8 and leaf == "weight" and len(shape) == 2 and DEFAULT_POLICY.quantizes(module):
            out_features = shape[0]
            specs[key] = (shape, FP8, lambda k, s, g: torch.randn(s, device=device, generator=g).to(FP8))
            specs[f"{module}.scale"] = ((out_features,), torch.float32,
                                        lambda k, s, g: torch.full(s, 0.01, device=device))  # fmt: skip
        else:
            specs[key] = (shape, torch.bfloat16, lambda k, s, g: _random(k, s, torch.bfloat16, device, g))
    return specs


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def write_expert(folder: Path, spec, device: str, fp8: bool, seed: int) -> int:
    from wanfast.accel.fp8 import DEFAULT_POLICY
    from wanfast.accel.fp8_checkpoint import MARKER, marker
    from wanfast.loading import dit_keys
    from wanfast.tools.testing import _model_type

    _remove(folder)  # no shard of an earlier write left beside the new ones
    nbytes = write_shards(folder, dit_specs(spec.dit, device, fp8), device, seed)
    config = dit_keys.official_config_json(spec.dit, _model_type(spec))
    if fp8:
        config |= {"text_dim": spec.dit.text_dim, MARKER: marker(DEFAULT_POLICY, torch.bfloat16)}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return nbytes


def write_rest(root: Path, spec, device: str, seed: int) -> dict:
    """UMT5 (bf16 .pth, official keys), the VAE (fp32 .pth) and a tokenizer folder."""
    from transformers import UMT5EncoderModel

    from wanfast.loading.t5_keys import hf_config, hf_to_official
    from wanfast.tools.testing import _vae
    from wanfast.tools.testing_text import write_tiny_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    hf = _meta_state_dict(lambda: UMT5EncoderModel(hf_config(spec.text_encoder)))
    official = hf_to_official(hf)  # both tied embedding keys -> the one official table
    gen = torch.Generator(device).manual_seed(seed)
    sd = {k: _random(k, tuple(t.shape), torch.bfloat16, device, gen).cpu() for k, t in official.items()}
    torch.save(sd, root / T5_FILE)
    del sd
    name, vae_sd, _ = _vae(spec, seed)  # the tested random init (finite decodes), small
    torch.save(vae_sd, root / name)
    # A small tokenizer (ids < 512 < the real vocabulary): the real one is not in this repository.
    write_tiny_tokenizer(root / "google" / "umt5-xxl", min(512, spec.text_encoder.vocab_size))
    return {"text_encoder": (root / T5_FILE).stat().st_size, "vae": (root / name).stat().st_size}


def cmd_write(a: argparse.Namespace) -> dict:
    spec, root, t0 = get_spec(a.spec), Path(a.root), time.perf_counter()
    out: dict = {"what": a.what, "spec": a.spec, "root": str(root)}
    if a.what == "rest":
        out["bytes"] = write_rest(root, spec, a.device, a.seed)
    else:
        fp8 = a.what == "fp8"
        experts = spec.experts[:1] if a.what == "bf16-expert" else spec.experts
        out["bytes"] = {}
        for i, name in enumerate(experts):
            folder = root / _DIRS[name]
            out["bytes"][name] = write_expert(folder, spec, a.device, fp8, a.seed + i)
        if a.what == "bf16-expert" and a.link_low and len(spec.experts) > 1:
            low = root / _DIRS[spec.experts[1]]
            _remove(low)
            low.symlink_to(_DIRS[spec.experts[0]], target_is_directory=True)
            out["linked"] = {spec.experts[1]: spec.experts[0]}
    os.sync()
    out["write_s"] = time.perf_counter() - t0
    return out


def cmd_dd(a: argparse.Namespace) -> dict:
    found = {p.resolve() for f in a.paths for p in (Path(f).rglob("*") if Path(f).is_dir() else [Path(f)])
             if p.is_file() and p.stat().st_size >= a.min_bytes}  # fmt: skip
    files = sorted(found)  # a linked folder's files once
    rows, total_b, total_s = [], 0, 0.0
    for f in files:
        t0 = time.perf_counter()
        proc = subprocess.run(["dd", f"if={f}", "of=/dev/null", "bs=16M"], capture_output=True, text=True)
        s = time.perf_counter() - t0
        m = re.search(r"^(\d+) bytes", proc.stderr, re.M)
        n = int(m.group(1)) if m else f.stat().st_size
        rows.append({"file": str(f), "bytes": n, "s": s, "GB_per_s": n / 1e9 / s, "rc": proc.returncode})
        total_b, total_s = total_b + n, total_s + s
    return {"files": rows, "bytes": total_b, "s": total_s, "GB_per_s": total_b / 1e9 / max(total_s, 1e-9)}


def cmd_h2d(a: argparse.Namespace) -> dict:
    dev, n = torch.device(a.device), int(a.gib * 2**30)
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    out = {"bytes": n, "device": str(dev)}
    for kind in ("pinned", "pageable"):
        src = torch.ones(n, dtype=torch.uint8, pin_memory=kind == "pinned" and dev.type == "cuda")
        best = float("inf")
        for _ in range(3):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=kind == "pinned")
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            best = min(best, time.perf_counter() - t0)
        out[kind] = {"s": best, "GB_per_s": n / 1e9 / best}
        del src
    return out


def cmd_serve(a: argparse.Namespace) -> dict:
    import signal
    import tempfile
    import urllib.error
    import urllib.request

    data = Path(tempfile.mkdtemp(prefix="wanfast-serve-cold-"))
    cmd = ["python3", "-m", "wanfast", "serve", "--ckpt-dir", a.ckpt, "--port", str(a.port), "--data-dir",
           str(data), "--warm-sizes", a.warm_sizes, *a.engine.split()]  # fmt: skip
    log = open(Path(a.out).with_suffix(".log"), "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    first_answer = ready = None
    body: dict = {}
    try:
        while time.perf_counter() - t0 < a.timeout and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{a.port}/health", timeout=2) as r:
                    body, code = json.loads(r.read()), r.status
            except urllib.error.HTTPError as e:
                body, code = json.loads(e.read() or b"{}"), e.code
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                code = None
            now = time.perf_counter() - t0
            if code is not None and first_answer is None:
                first_answer = now
            warm = [s for w in body.get("workers", []) for s in (w.get("warm_sizes") or [])]
            if code == 200 and all(s in warm for s in a.warm_sizes.split(",")):
                ready = now
                break
            time.sleep(0.1)
    finally:
        exited = proc.poll()  # a server that stopped on its own: its log says why
        if exited is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(data, ignore_errors=True)
    return {"cmd": cmd, "first_health_answer_s": first_answer, "ready_s": ready, "health": body,
            "exited_by_itself": exited, "exit_code_after_stop": proc.returncode}  # fmt: skip


def cmd_summary(a: argparse.Namespace) -> dict:
    """Every JSON under the run folder, and per generate run the load spans against the dd rates."""
    folder = Path(a.folder)
    parts = {str(p.relative_to(folder)): json.loads(p.read_text()) for p in sorted(folder.rglob("*.json"))
             if p.name != Path(a.out).name}  # fmt: skip
    dd = {k: v for k, v in parts.items() if k.startswith("dd_")}
    rates = {k: v["GB_per_s"] for k, v in dd.items()}
    runs = {}
    for k, v in parts.items():
        if k.startswith("gen_") and "phases" in v:
            name = k.removeprefix("gen_").removesuffix(".json")
            state = parts.get(f"meta_{name}.json", {}).get("page_cache")
            # the dd rate of the same kind of bytes read the same way: cold runs against dd of the cold
            # files, warm FP8 runs against dd from the page cache (the bf16 stage has no warm dd)
            ref = rates.get(f"dd_{name.split('_')[0]}_{state}.json")
            loads = {}
            for n, r in v["spans"].items():
                if n.startswith("load_"):
                    row = {"s": r["s"], "bytes": r.get("bytes"), "GB_per_s": r.get("GB_per_s")}
                    if ref and r.get("bytes"):  # load time / dd time of the same bytes (target <= 1.3 cold)
                        row["vs_dd_time"] = r["s"] / (r["bytes"] / 1e9 / ref)
                    loads[n] = row
            runs[k] = {"page_cache": state, "to_first_step_s": v["to_first_step_s"], "to_mp4_s": v["to_mp4_s"],
                       "overlap_load": v.get("overlap_load"), "phases": v["phases"], "loads": loads,
                       "compile": v["compile"]}  # fmt: skip
    return {"dd_GB_per_s": rates, "runs": runs, "parts": parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--spec", default="t2v-A14B")
    w.add_argument("--root", required=True)
    w.add_argument("--what", choices=["rest", "fp8", "bf16", "bf16-expert"], required=True)
    w.add_argument("--link-low", action="store_true")
    w.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    w.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("dd")
    d.add_argument("paths", nargs="+")
    d.add_argument("--min-bytes", type=int, default=1, help="skip smaller files")
    h = sub.add_parser("h2d")
    h.add_argument("--gib", type=float, default=4.0)
    h.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    v = sub.add_parser("serve")
    v.add_argument("--ckpt", required=True)
    v.add_argument("--warm-sizes", default="832x480x81")
    v.add_argument("--engine", default="", help="more `wanfast serve` flags (device, compile cache, ...)")
    v.add_argument("--port", type=int, default=8765)
    v.add_argument("--timeout", type=float, default=300.0)
    s = sub.add_parser("summary")
    s.add_argument("folder")
    for p in (w, d, h, v, s):
        p.add_argument("--out", required=True)
    a = ap.parse_args()
    cmds = {"write": cmd_write, "dd": cmd_dd, "h2d": cmd_h2d, "serve": cmd_serve, "summary": cmd_summary}
    result = cmds[a.cmd](a)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: v for k, v in result.items() if k not in ("parts", "files")}, default=str)[:2000])


if __name__ == "__main__":
    main()
