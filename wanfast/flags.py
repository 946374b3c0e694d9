"""Command-line flags shared by ``generate``, ``serve`` and ``bench``: the model source and every engine
setting, declared once, and turned into ``EngineSettings`` in one place (``engine_settings``).

Import-light (argparse and the config only): building the parser must not load torch model code or
transformers, so ``wanfast --help`` answers at once.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from wanfast.config import COMPILE_MODES, ConfigError, EngineSettings, LoraSpec, parse_dtype
from wanfast.specs import PUBLISHED, SPECS


def add_model_source(p: argparse.ArgumentParser) -> None:
    """--ckpt-dir or --model NAME: where the models come from."""
    tiny = [n for n in SPECS if n.startswith("tiny")]
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt-dir", type=Path,
                     help="a Wan2.2 checkpoint folder (T2V-A14B, TI2V-5B, I2V-A14B; official or Diffusers layout)")  # fmt: skip
    src.add_argument("--model", choices=tiny,
                     help="a small random-weight model of that family (CPU tests, demos)")  # fmt: skip


def defaults_help(field: str, fmt=str) -> str:
    """'the model's: t2v-A14B 40, ti2v-5B 50, ...' from the published specs' sampling defaults."""
    parts = [f"{n} {fmt(getattr(SPECS[n].defaults, field))}" for n in PUBLISHED if n in SPECS]
    return "default: the model's (" + ", ".join(parts) + ")"


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Every ``EngineSettings`` switch, for generate and serve alike."""
    dev = p.add_argument_group("device and precision")
    dev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    dev.add_argument(
        "--dtype", default=None, help="DiT/text-encoder dtype: bf16 (default on GPU), fp16, fp32"
    )
    dev.add_argument("--vae-dtype", default=None, help="VAE dtype (default fp32, as official)")
    dev.add_argument("--text-encoder-device", default=None, help="e.g. cpu to keep UMT5 off the GPU")
    dev.add_argument("--t5-cpu", dest="text_encoder_device", action="store_const", const="cpu",
                     help="run the text encoder on the CPU (= --text-encoder-device cpu)")  # fmt: skip
    dev.add_argument("--attention", default="auto", help="attention backend (default: fastest available)")
    dev.add_argument("--self-attention", default=None, metavar="BACKEND",
                     help="the DiT self-attention backend only, e.g. a lossy 8-bit one (default: --attention)")  # fmt: skip
    dev.add_argument("--quant", choices=["fp8"], default=None, help="lossy: FP8 e4m3 DiT linear layers")
    opt = p.add_argument_group("optimisations (lossless; each on by default where it pays)")
    opt.add_argument("--plain", action="store_true",
                     help="turn every optimisation off, the VAE decode rewrite included: the eager reference")  # fmt: skip
    opt.add_argument("--no-compile", action="store_true", help="no regional torch.compile of the DiT blocks")
    opt.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                     help="tune inductor's kernels (longer first compile; default: inductor's defaults)")  # fmt: skip
    opt.add_argument("--compile-cache", default=None, metavar="DIR",
                     help="keep torch.compile's artifacts in DIR (one set per model and size) and reuse them in "
                     "later processes, on this or another machine of the same kind")  # fmt: skip
    opt.add_argument("--no-fuse", action="store_true", help="separate Q/K/V (and K/V) projections")
    opt.add_argument("--no-cache", action="store_true", help="no cross-attention K/V and RoPE caches")
    opt.add_argument("--no-vae-opt", action="store_true", help="the plain VAE decode")
    opt.add_argument("--cuda-graphs", action="store_true", help="capture the DiT forward in CUDA graphs")
    opt.add_argument("--no-fp8-row-kernels", action="store_true",
                     help="FP8 linears quantise their input with torch ops, not wanfast's one-pass kernel")  # fmt: skip
    opt.add_argument("--no-overlap-load", action="store_true",
                     help="load the low-noise expert before the first step, not during the high-noise steps")  # fmt: skip
    mem = p.add_argument_group("memory modes and LoRA")
    mem.add_argument("--offload", choices=["expert", "blocks"], default=None,
                     help="expert: only the active expert on the GPU; blocks: DiT blocks streamed to the GPU")  # fmt: skip
    mem.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                     help="pick the fastest memory mode (resident, expert, blocks) whose estimate fits GIB, "
                     "and cap the process's GPU memory at it")  # fmt: skip
    mem.add_argument("--lora", action="append", default=[], type=_lora_spec, metavar="FILE[:HIGH[:LOW]]",
                     help="a LoRA and its strength on the high- and low-noise experts (LOW defaults to HIGH, "
                     "HIGH to 1; a one-DiT model takes HIGH); repeat to stack, e.g. --lora a.safetensors:3:1.5")  # fmt: skip
    mem.add_argument("--lora-high-noise", default=None, metavar="FILE",
                     help="LoRA for the high-noise expert (of a one-DiT model: its DiT)")  # fmt: skip
    mem.add_argument("--lora-low-noise", default=None, metavar="FILE", help="LoRA for the low-noise expert")
    mem.add_argument("--lora-strength", type=float, default=1.0,
                     help="strength of --lora-high-noise / --lora-low-noise (default 1.0)")  # fmt: skip
    mem.add_argument("--lora-separate", action="store_true", help="keep LoRA unmerged (switchable)")
    par = p.add_argument_group("multi-GPU (launch with torchrun --nproc-per-node N; N = 2 x K or K)")
    par.add_argument("--cfg-parallel", action="store_true", help="cond / uncond passes on two rank groups")
    par.add_argument("--ulysses", type=int, default=1, metavar="K", help="sequence-parallel degree (1)")
    par.add_argument("--ulysses-chunks", type=int, default=1, metavar="G",
                     help="head groups whose all-to-alls overlap the attention; 1 = off, the measured "
                     "default (G must divide the heads per rank)")  # fmt: skip


def _lora_spec(text: str) -> LoraSpec:
    try:
        return LoraSpec.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    """The per-process settings from the flags of ``add_engine_flags`` (unresolved: the builder settles
    device and dtypes)."""
    settings = EngineSettings(
        device=args.device,
        dtype=parse_dtype(args.dtype) if args.dtype else None,
        vae_dtype=parse_dtype(args.vae_dtype) if args.vae_dtype else None,
        text_encoder_device=args.text_encoder_device,
        attention_backend=args.attention,
        self_attention_backend=args.self_attention,
        memory_budget_gb=args.memory_budget,
        quant=args.quant,
        cfg_parallel=args.cfg_parallel,
        ulysses=args.ulysses,
        ulysses_chunks=args.ulysses_chunks,
        offload=args.offload,
        loras=tuple(args.lora),
        lora_high_noise=args.lora_high_noise,
        lora_low_noise=args.lora_low_noise,
        lora_strength=args.lora_strength,
        lora_merge=not args.lora_separate,
        compile_mode=args.compile_mode,
        compile_cache=str(args.compile_cache) if args.compile_cache else None,
        overlap_load=not args.no_overlap_load,
    )
    if args.plain:
        return settings.plain()
    return replace(
        settings,
        compile=False if args.no_compile else settings.compile,
        fp8_row_kernels=not args.no_fp8_row_kernels,
        fuse_projections=not args.no_fuse,
        cache_cross_kv=not args.no_cache,
        cache_rope=not args.no_cache,
        optimize_vae=not args.no_vae_opt,
        cuda_graphs=args.cuda_graphs,
    )
