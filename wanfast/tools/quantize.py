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

from wanfast.config import ConfigError

DIT_WEIGHTS = "diffusion_pytorch_model"


def save_sharded(sd: dict, folder: Path, max_shard_bytes: int) -> list[str]:
    """``{stem}-0000k-of-0000n.safetensors`` of at most ``max_shard_bytes`` each (one file if it fits) +
    ``{stem}.safetensors.index.json``; returns the shard names."""
    from safetensors.torch import save_file

    shards: list[dict] = [{}]
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
    policy=None,
    device: str = "cpu",
    dtype=None,
    max_shard_bytes: int = 5 * 10**9,
) -> dict:
    """One expert folder (official or Diffusers) -> an FP8 expert folder; returns a summary."""
    import torch

    from wanfast.accel.fp8 import DEFAULT_POLICY, fp8_modules, quantize_dit_
    from wanfast.accel.fp8_checkpoint import MARKER, fp8_state_dict, marker
    from wanfast.loading import dit_keys
    from wanfast.loading.layout import load_transformer, model_type

    policy, dtype = policy or DEFAULT_POLICY, dtype or torch.bfloat16
    dit = load_transformer(src, device, dtype)  # unfused, official key names
    quantize_dit_(dit, policy)  # per output channel, so it equals quantising the fused weights later
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    sd = fp8_state_dict(dit)
    shards = save_sharded(sd, dst, max_shard_bytes)
    kind = model_type(src) or "t2v"
    config = dit_keys.official_config_json(dit.cfg, kind) | {
        "text_dim": dit.cfg.text_dim,
        MARKER: marker(policy, dtype),
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return {"src": str(src), "dst": str(dst), "fp8_linears": len(fp8_modules(dit)), "shards": len(shards),
            "bytes": sum(t.numel() * t.element_size() for t in sd.values())}  # fmt: skip


def _link(src: Path, dst: Path) -> None:
    try:
        dst.symlink_to(src.resolve(), target_is_directory=src.is_dir())
    except OSError:  # file systems without symlinks
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)


def _is_dit_file(entry: Path) -> bool:
    return entry.name == "config.json" or entry.name.startswith(DIT_WEIGHTS)


def quantize_checkpoint(
    src: str | os.PathLike, dst: str | os.PathLike, policy=None, device: str = "cpu"
) -> list[dict]:
    """A whole checkpoint folder: every DiT quantised, everything else linked. Returns the summaries."""
    from wanfast.loading.layout import detect, is_fp8_checkpoint

    src, dst = Path(src), Path(dst)
    _, paths = detect(src)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"--out {dst} exists and is not an empty folder: give a new or empty one")
    experts = {p.resolve() for p in paths.experts.values()}
    for expert in experts:
        if is_fp8_checkpoint(expert):
            raise ConfigError(f"{expert} is already an FP8 checkpoint")
    dst.mkdir(parents=True, exist_ok=True)
    done = []

    def report(name: str) -> None:
        print(f"quantised {name}: {done[-1]['fp8_linears']} FP8 linears, {done[-1]['bytes'] / 1e9:.2f} GB")

    if src.resolve() in experts:  # a one-DiT official folder: the DiT files sit at the root
        done.append(quantize_expert(src, dst, policy, device))
        report(src.name)
    for entry in sorted(src.iterdir()):
        if entry.resolve() in experts:
            done.append(quantize_expert(entry, dst / entry.name, policy, device))
            report(entry.name)
        elif not (src.resolve() in experts and _is_dit_file(entry)):
            _link(entry, dst / entry.name)  # text encoder, VAE, tokenizer, Diffusers index and scheduler
    return done


def quantize_main(args: argparse.Namespace) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quantize_checkpoint(args.ckpt_dir, args.out, None, device)
    print(f"FP8 checkpoint written to {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quantize", help="write an FP8 (e4m3) copy of a checkpoint's DiT experts (lossy)"
    )
    p.add_argument(
        "--ckpt-dir", type=Path, required=True, help="a Wan2.2 checkpoint folder (official or Diffusers)"
    )
    p.add_argument("--out", type=Path, required=True, help="new folder for the FP8 checkpoint")
    p.add_argument("--device", default=None, help="where to quantise (default: cuda if available, else cpu)")
    p.set_defaults(func=quantize_main)
    return p
