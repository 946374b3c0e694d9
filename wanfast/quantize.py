"""``wanfast quantize --ckpt-dir SRC --out DST``: an FP8 copy of a Wan2.2 checkpoint that loads directly.

DST mirrors SRC's folder layout (official or Diffusers): each DiT expert folder is replaced by an FP8
expert folder (``loading/fp8_checkpoint.py``: official config.json + marker, official key names, FP8
weights with per-output-channel ``.scale`` tensors, sharded safetensors with an index); every other entry
(text encoder, VAE, tokenizer, model_index.json, ...) is symlinked to SRC's (copied where links fail).
An A14B expert goes from ~28.6 GB (bf16) to ~14.5 GB. One expert is in memory at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from wanfast.accel.fp8 import DEFAULT_POLICY, Policy, fp8_modules, quantize_dit_
from wanfast.loading import dit_keys
from wanfast.loading.fp8_checkpoint import DIT_WEIGHTS, MARKER, fp8_state_dict, is_fp8_checkpoint, marker
from wanfast.loading.layout import detect_layout, load_transformer


def save_sharded(sd: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """``{stem}-0000k-of-0000n.safetensors`` of at most ``max_shard_bytes`` each (one file if it fits) +
    ``{stem}.safetensors.index.json``; returns the shard names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(sd):
        n = sd[key].numel() * sd[key].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = sd[key].cpu()
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(folder / f"{DIT_WEIGHTS}.safetensors"), metadata={"format": "pt"})
        return [f"{DIT_WEIGHTS}.safetensors"]
    names, weight_map = [], {}
    for i, part in enumerate(shards):
        name = f"{DIT_WEIGHTS}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{DIT_WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def quantize_expert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    policy: Policy = DEFAULT_POLICY,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 10**9,
) -> dict:
    """One expert folder (official or Diffusers) -> an FP8 expert folder; returns a summary."""
    dit = load_transformer(src, device, dtype)  # unfused, official key names
    quantize_dit_(dit, policy)  # per output channel, so it equals quantising the fused weights later
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    sd = fp8_state_dict(dit)
    shards = save_sharded(sd, dst, max_shard_bytes)
    config = dit_keys.official_config_json(dit.cfg) | {MARKER: marker(policy, dtype)}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return {"src": str(src), "dst": str(dst), "fp8_linears": len(fp8_modules(dit)), "shards": len(shards),
            "bytes": sum(t.numel() * t.element_size() for t in sd.values())}  # fmt: skip


def _link(src: Path, dst: Path) -> None:
    try:
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
    except OSError:  # file systems without symlinks
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def quantize_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, policy: Policy = DEFAULT_POLICY, device: str = "cpu"
) -> list[dict]:
    """A whole checkpoint folder: both experts quantised, everything else linked. Returns the summaries."""
    src, dst = Path(src), Path(dst)
    layout = detect_layout(src)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    experts = {layout.high_noise.resolve(), layout.low_noise.resolve()}
    for expert in experts:
        if is_fp8_checkpoint(expert):
            raise ValueError(f"{expert} is already an FP8 checkpoint")
    dst.mkdir(parents=True, exist_ok=True)
    done = []
    for entry in sorted(src.iterdir()):
        if entry.resolve() in experts:
            done.append(quantize_expert(entry, dst / entry.name, policy, device))
            print(
                f"quantised {entry.name}: {done[-1]['fp8_linears']} FP8 linears, {done[-1]['bytes'] / 1e9:.2f} GB"
            )
        else:  # text encoder, VAE, tokenizer (official google/ folder), Diffusers index and scheduler
            _link(entry, dst / entry.name)
    return done


def quantize_main(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quantize_checkpoint(args.ckpt_dir, args.out, DEFAULT_POLICY, device)
    print(f"FP8 checkpoint written to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize", help="write an FP8 (e4m3) copy of a checkpoint's DiT experts (lossy)"
    )
    p.add_argument(
        "--ckpt-dir", type=Path, required=True, help="Wan2.2-T2V-A14B folder (official or Diffusers)"
    )
    p.add_argument("--out", type=Path, required=True, help="new folder for the FP8 checkpoint")
    p.add_argument("--device", default=None, help="where to quantise (default: cuda if available, else cpu)")
    p.set_defaults(func=quantize_main)
    return p
