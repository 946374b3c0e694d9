"""Command line: ``wanfast generate ...`` (also ``python -m wanfast``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from wanfast.batch import forwards_text
from wanfast.config import (
    COMPILE_MODES,
    PRESETS,
    SOLVERS,
    ConfigError,
    EngineSettings,
    SamplingParams,
    parse_dtype,
)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1280x720, got {text!r}") from None
    return w, h


def add_model_source(p: argparse.ArgumentParser) -> None:
    """--ckpt-dir or --model tiny: where the models come from (generate, serve)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt-dir", type=Path, help="Wan2.2-T2V-A14B folder (official or Diffusers layout)")
    src.add_argument("--model", choices=["tiny"], help="'tiny': small random-weight model (CPU tests, demos)")


def add_engine_memory_flags(p: argparse.ArgumentParser) -> None:
    """Engine switches shared by generate and serve: text-encoder placement, self-attention kernel, FP8,
    compile tuning, memory mode and budget."""
    p.add_argument("--text-encoder-device", default=None, help="e.g. cpu to keep UMT5 off the GPU")
    p.add_argument("--t5-cpu", dest="text_encoder_device", action="store_const", const="cpu",
                   help="run the text encoder on the CPU (= --text-encoder-device cpu)")  # fmt: skip
    p.add_argument("--self-attention", default=None, metavar="BACKEND",
                   help="the DiT self-attention backend only, e.g. a lossy 8-bit one (default: --attention)")  # fmt: skip
    p.add_argument("--quant", choices=["fp8"], default=None, help="lossy: FP8 e4m3 DiT linear layers")
    p.add_argument("--no-fp8-row-kernels", action="store_true",
                   help="FP8 linears quantise their input with torch ops, not wanfast's one-pass kernel")  # fmt: skip
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default=None,
                   help="tune inductor's kernels (longer first compile; default: inductor's defaults)")  # fmt: skip
    p.add_argument("--offload", choices=["expert", "blocks"], default=None,
                   help="expert: only the active expert on the GPU; blocks: DiT blocks streamed to the GPU")  # fmt: skip
    p.add_argument("--memory-budget", type=float, default=None, metavar="GIB",
                   help="pick the fastest memory mode (resident, expert, blocks) whose estimate fits GIB, "
                   "and cap the process's GPU memory at it")  # fmt: skip


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a video from a prompt")
    p.set_defaults(func=generate)
    add_model_source(p)
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="the text prompt")
    text.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    text.add_argument("--prompts-file", type=Path, metavar="FILE",
                      help="many requests, one model load: a JSON object per line with \"prompt\" and any "
                      "per-prompt overrides (size, frames, steps, seed, ..., output); run one after the "
                      "other, not batched (no throughput gain measured at 720p). Outputs: each line's "
                      "\"output\", else <--output stem>_<index>.mp4")  # fmt: skip
    p.add_argument("--negative-prompt", default=None, help="default: the official negative prompt")
    p.add_argument(
        "--size", type=_size, default=None, help="WIDTHxHEIGHT, multiples of 16 (default 1280x720)"
    )
    p.add_argument("--frames", type=int, default=None, help="frame count, 4n+1 (default 81)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solver", choices=SOLVERS, default=None, help="default unipc, as official")
    p.add_argument("--shift", type=float, default=None, help="sigma shift (default 12.0)")
    p.add_argument(
        "--guidance-high-noise", type=float, default=None, help="CFG scale of the high-noise expert"
    )
    p.add_argument("--guidance-low-noise", type=float, default=None, help="CFG scale of the low-noise expert")
    p.add_argument("--boundary", type=float, default=None, help="expert switch, fraction of 1000 (0.875)")
    p.add_argument("--cfg-steps", type=int, default=None, metavar="K",
                   help="lossy: guidance for the first K steps only, one pass per step after (default: all)")  # fmt: skip
    p.add_argument("--step-cache", type=float, default=None, metavar="THRESHOLD",
                   help="lossy: skip a DiT forward while the input changed less than THRESHOLD (0: off)")  # fmt: skip
    p.add_argument("--fps", type=int, default=None, help="frame rate of the MP4 (default 16)")
    p.add_argument("--output", type=Path, default=Path("output.mp4"))
    p.add_argument(
        "--save-latents", type=Path, default=None, help="also write the final latents (safetensors)"
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, help="DiT/text-encoder dtype: bf16 (default on GPU), fp16, fp32")
    p.add_argument("--vae-dtype", default="fp32", help="VAE dtype (default fp32, as official)")
    add_engine_memory_flags(p)
    p.add_argument("--attention", default="auto", help="attention backend (default: fastest available)")
    opt = p.add_argument_group("optimisations (lossless; each on by default where it pays)")
    opt.add_argument("--plain", action="store_true", help="turn every optimisation off: the eager reference")
    opt.add_argument("--no-compile", action="store_true", help="no regional torch.compile of the DiT blocks")
    opt.add_argument("--no-fuse", action="store_true", help="separate Q/K/V (and K/V) projections")
    opt.add_argument("--no-cache", action="store_true", help="no cross-attention K/V and RoPE caches")
    opt.add_argument("--no-vae-opt", action="store_true", help="the plain VAE decode")
    opt.add_argument("--cuda-graphs", action="store_true", help="capture the DiT forward in CUDA graphs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    mem = p.add_argument_group("memory modes and LoRA")
    mem.add_argument("--lora-high-noise", default=None, metavar="FILE", help="LoRA for the high-noise expert")
    mem.add_argument("--lora-low-noise", default=None, metavar="FILE", help="LoRA for the low-noise expert")
    mem.add_argument("--lora-strength", type=float, default=1.0, help="LoRA scale (default 1.0)")
    mem.add_argument("--lora-separate", action="store_true", help="keep LoRA unmerged (switchable)")
    mem.add_argument("--sampling-preset", default=None, metavar="NAME",
                     help="sampling values a LoRA expects, e.g. lightning-4step (4 steps, guidance 1, euler)")  # fmt: skip
    par = p.add_argument_group("multi-GPU (launch with torchrun --nproc-per-node N; N = 2 x K or K)")
    par.add_argument("--cfg-parallel", action="store_true", help="cond / uncond passes on two rank groups")
    par.add_argument("--ulysses", type=int, default=1, metavar="K", help="sequence-parallel degree (1)")
    par.add_argument("--gpus", default=None, metavar="LIST",
                     help="with --prompts-file: one worker per GPU (e.g. 0,1), that many lines at a time")  # fmt: skip
    par.add_argument("--workers", type=int, default=None, metavar="N",
                     help="with --prompts-file: N worker processes without --gpus (e.g. on the CPU)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wanfast", description="Fast Wan2.2 text-to-video inference")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    from wanfast import bench, compare, quantize
    from wanfast.server import cli as server_cli

    bench.register(sub)
    quantize.register(sub)
    compare.register(sub)
    server_cli.register(sub)
    return parser


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        return args.prompt_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read prompt file {args.prompt_file}: {e}") from e


def _overrides(args: argparse.Namespace) -> dict:
    """The sampling overrides the flags give (None: not given), after any --sampling-preset."""
    overrides = dict(
        negative_prompt=args.negative_prompt or None, frames=args.frames, steps=args.steps, seed=args.seed,
        solver=args.solver, shift=args.shift, guidance_high_noise=args.guidance_high_noise,
        guidance_low_noise=args.guidance_low_noise, boundary=args.boundary, cfg_steps=args.cfg_steps,
        step_cache_threshold=args.step_cache,
    )  # fmt: skip
    if args.size is not None:
        overrides["width"], overrides["height"] = args.size
    if args.sampling_preset is not None:  # the preset's values, then every flag given explicitly
        from wanfast.presets import sampling_overrides

        overrides = {
            **sampling_overrides(args.sampling_preset),
            **{k: v for k, v in overrides.items() if v is not None},
        }
    return overrides


def _params(args: argparse.Namespace, defaults) -> SamplingParams:
    return SamplingParams.from_defaults(defaults, _read_prompt(args), **_overrides(args))


def _summary(result, fps: int, output: Path) -> str:
    t = result.timings
    rows = [("text encoding", f"{t.get('text_encoding', 0):.2f} s")]
    for name in ("high_noise", "low_noise"):
        n = result.steps_per_expert.get(name, 0)
        if n:
            secs = t.get(f"denoise_{name}", 0.0)
            rows.append(
                (
                    f"{name.replace('_', '-')} expert",
                    f"{n} step{'s' * (n != 1)}, {secs:.2f} s ({secs / n:.2f} s/step)",
                )
            )
    rows += [("VAE decode", f"{t.get('vae_decode', 0):.2f} s"), ("total", f"{t.get('total', 0):.2f} s")]
    forwards = forwards_text(result)
    if forwards:
        rows.append(("DiT forwards", forwards))
    if result.peak_memory_bytes is not None:
        rows.append(("peak GPU memory", f"{result.peak_memory_bytes / 2**30:.2f} GiB"))
    p = result.params
    rows.append(("video", f"{output} ({p.width}x{p.height}, {p.frames} frames, {fps} fps, seed {p.seed})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def engine_settings(args: argparse.Namespace, device: str, dtype, vae_dtype) -> EngineSettings:
    """The per-process settings from the command line: every optimisation switch has a flag."""
    settings = EngineSettings(
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        text_encoder_device=args.text_encoder_device,
        attention_backend=args.attention,
        self_attention_backend=args.self_attention,
        memory_budget_gb=args.memory_budget,
        quant=args.quant,
        cfg_parallel=args.cfg_parallel,
        ulysses=args.ulysses,
        offload=args.offload,
        lora_high_noise=args.lora_high_noise,
        lora_low_noise=args.lora_low_noise,
        lora_strength=args.lora_strength,
        lora_merge=not args.lora_separate,
    )
    if args.plain:
        return settings.plain()
    return replace(
        settings,
        compile=False if args.no_compile else settings.compile,
        compile_mode=args.compile_mode,
        fp8_row_kernels=not args.no_fp8_row_kernels,
        fuse_projections=not args.no_fuse,
        cache_cross_kv=not args.no_cache,
        cache_rope=not args.no_cache,
        optimize_vae=not args.no_vae_opt,
        cuda_graphs=args.cuda_graphs,
    )


def out_of_memory_message(source, params: SamplingParams, device: str) -> str:
    """What a user reads after an out-of-memory error: the memory mode that would fit this request."""
    from wanfast.accel.offload import MemoryBudgetError, choose_mode

    # The card's total memory: after the failure, "free" mostly reflects our own resident weights.
    free = torch.cuda.mem_get_info(torch.device(device))[1] if torch.device(device).type == "cuda" else 0
    size = (params.width, params.height)
    try:
        mode = choose_mode(source, size, params.frames, free, requested=None)
    except MemoryBudgetError as e:
        return f"out of GPU memory: {e}"
    return f"out of GPU memory, although the estimate fits ({mode or 'resident'}); try --offload blocks"


def generate(args: argparse.Namespace) -> int:
    preset = PRESETS["tiny" if args.model == "tiny" else "t2v-A14B"]
    # every request field (every line of a prompts file) is validated before any weights load
    items, params = None, None
    if args.prompts_file is not None:
        from wanfast.batch import read_prompts_file

        items = read_prompts_file(
            args.prompts_file, _overrides(args), preset.defaults, args.output, args.save_latents
        )
        plan_sizes = [(i.params.width, i.params.height, i.params.frames) for i in items]
    if args.gpus is not None or args.workers is not None:  # the lines spread over a worker pool
        from wanfast.server.batchpool import run_on_pool

        return run_on_pool(args, items, args.fps or preset.defaults.fps)
    if items is None:
        params = _params(args, preset.defaults)
        plan_sizes = [(params.width, params.height, params.frames)]
    num_heads, layout = preset.dit.num_heads, None
    if args.ckpt_dir is not None:
        from wanfast.loading.layout import detect_layout, dit_config

        layout = detect_layout(args.ckpt_dir)  # fails fast on a wrong or incomplete folder
        num_heads = dit_config(layout.high_noise)[0].num_heads  # config.json only, no weights
    for lora in (args.lora_high_noise, args.lora_low_noise):
        if lora is not None and not Path(lora).is_file():
            raise FileNotFoundError(f"LoRA file not found: {lora}")
    if args.cfg_parallel or args.ulysses != 1:
        from wanfast.parallel.dist import check_split

        check_split(args.cfg_parallel, args.ulysses, int(os.environ.get("WORLD_SIZE", "1")), num_heads)
    from wanfast.parallel import init_distributed

    rank, local_rank = init_distributed()  # torchrun: join the group (no-op in a plain run)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and torch.distributed.is_initialized():
        device = f"cuda:{local_rank}"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    dtype = parse_dtype(args.dtype or ("bf16" if torch.device(device).type == "cuda" else "fp32"))
    vae_dtype = parse_dtype(args.vae_dtype)

    from wanfast import attention
    from wanfast.api import load_pipeline, model_preset, plan_memory, tiny_pipeline
    from wanfast.video import write_mp4

    settings = engine_settings(args, device, dtype, vae_dtype)
    if args.model == "tiny":
        settings = replace(settings, vae_dtype=dtype)
    mem_preset, fp8_checkpoint = model_preset(layout)  # config files only
    settings, why = plan_memory(settings, mem_preset, plan_sizes, fp8_checkpoint)  # before any weights load
    if why and rank == 0:
        print(why, file=sys.stderr)
    if args.model == "tiny":
        pipe = tiny_pipeline(device=device, dtype=dtype, settings=settings, plan_sizes=plan_sizes)
    else:
        pipe = load_pipeline(args.ckpt_dir, settings=settings, plan_sizes=plan_sizes)
        if params is not None and args.boundary is None and pipe.defaults.boundary != params.boundary:
            params = params.with_(boundary=pipe.defaults.boundary)  # the checkpoint's own boundary
    if rank == 0:
        own = attention.active_self_attention_backend()
        extra = f", self-attention {own}" if own != attention.active_backend() else ""
        print(f"attention backend: {attention.active_backend()}{extra}", file=sys.stderr)

    def progress_for(p: SamplingParams):
        if args.no_progress or rank != 0:
            return None
        from tqdm import tqdm

        bar = tqdm(total=p.steps, desc="denoising", unit="step", file=sys.stderr)

        def progress(i: int, n: int, expert: str) -> None:
            bar.set_postfix_str(expert)
            bar.update(1)
            if i + 1 == n:
                bar.close()

        return progress

    def write(result, output: Path, latents: Path | None, fps: int) -> None:
        write_mp4(result.frames, output, fps=fps)
        if latents is not None:
            from safetensors.torch import save_file

            latents.parent.mkdir(parents=True, exist_ok=True)
            save_file({"latents": result.latents.contiguous()}, str(latents))

    fps = args.fps or preset.defaults.fps
    if items is not None:
        from wanfast.batch import run_batch

        def write_item(result, item, item_fps: int) -> None:
            write(result, item.output, item.latents, item_fps)

        return run_batch(pipe, items, fps, write_item, progress_for, rank)
    try:
        result = pipe.run(params, progress_for(params))
    except torch.OutOfMemoryError as e:
        raise ConfigError(out_of_memory_message(pipe, params, device)) from e
    if rank != 0:  # every rank holds the same result; only rank 0 writes
        return 0
    write(result, args.output, args.save_latents, fps)
    print(_summary(result, fps, args.output))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"wanfast: error: {e}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():  # a torchrun launch: leave the group cleanly
            torch.distributed.destroy_process_group()
