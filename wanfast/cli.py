"""Command line: ``wanfast generate ...`` (also ``python -m wanfast``); ``bench``, ``compare``, ``quantize``
and ``serve`` register their own subcommands. Building the parser imports no model code."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from wanfast.batch import forwards_text
from wanfast.config import SOLVERS, ConfigError, SamplingParams
from wanfast.flags import add_engine_flags, add_model_source, defaults_help, engine_settings


def _size(text: str) -> tuple[int, int]:
    from wanfast.specs import parse_size  # the one size parser

    try:
        return parse_size(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a video from a prompt (and an image)")
    p.set_defaults(func=generate)
    add_model_source(p)
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="the text prompt")
    text.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    text.add_argument("--prompts-file", type=Path, metavar="FILE",
                      help="many requests, one model load: a JSON object per line with \"prompt\" and any "
                      "per-prompt overrides (size, frames, steps, seed, image, ..., output); run one after "
                      "the other, not batched (no throughput gain measured at 720p). Outputs: each line's "
                      "\"output\", else <--output stem>_<index>.mp4")  # fmt: skip
    p.add_argument("--image", type=Path, default=None,
                   help="the first frame (TI2V, I2V models): the output size then follows its aspect ratio "
                   "within the --size area")  # fmt: skip
    p.add_argument("--negative-prompt", default=None, help="default: the official negative prompt")
    p.add_argument("--size", type=_size, default=None, metavar="WxH",
                   help="WIDTHxHEIGHT, multiples of the model's grid (16 for A14B, 32 for TI2V-5B); with "
                   "--image, the maximum area; " + defaults_help("size", lambda s: f"{s[0]}x{s[1]}"))  # fmt: skip
    p.add_argument("--frames", type=int, default=None, help="frame count, 4n+1; " + defaults_help("frames"))
    p.add_argument("--steps", type=int, default=None, help="sampling steps; " + defaults_help("steps"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solver", choices=SOLVERS, default=None, help="default unipc, as official")
    p.add_argument("--shift", type=float, default=None, help="sigma shift; " + defaults_help("shift"))
    p.add_argument(
        "--guidance", type=float, default=None, help="CFG scale of every expert (one-DiT models: its scale)"
    )
    p.add_argument("--guidance-high-noise", type=float, default=None,
                   help="CFG scale of the high-noise expert; " + defaults_help("guidance_high_noise"))  # fmt: skip
    p.add_argument("--guidance-low-noise", type=float, default=None,
                   help="CFG scale of the low-noise expert; " + defaults_help("guidance_low_noise"))  # fmt: skip
    p.add_argument("--boundary", type=float, default=None,
                   help="expert switch, fraction of 1000; " + defaults_help("boundary"))  # fmt: skip
    p.add_argument("--cfg-steps", type=int, default=None, metavar="K",
                   help="lossy: guidance for the first K steps only, one pass per step after (default: all)")  # fmt: skip
    p.add_argument("--step-cache", type=float, default=None, metavar="THRESHOLD",
                   help="lossy: skip a DiT forward while the input changed less than THRESHOLD (0: off)")  # fmt: skip
    p.add_argument("--sampling-preset", default=None, metavar="NAME",
                   help="sampling values a LoRA expects, e.g. lightning-4step (4 steps, guidance 1, euler)")  # fmt: skip
    p.add_argument(
        "--fps", type=_positive_int, default=None, help="frame rate of the MP4; " + defaults_help("fps")
    )
    p.add_argument("--output", type=Path, default=Path("output.mp4"))
    p.add_argument(
        "--save-latents", type=Path, default=None, help="also write the final latents (safetensors)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-stream-mp4", action="store_true",
                   help="encode the MP4 after the VAE decode, not during it (same file; also "
                   "WANFAST_STREAM_MP4=0)")  # fmt: skip
    p.add_argument("--timings", type=Path, default=None, metavar="FILE",
                   help="write where this process spent its time as JSON: imports, each component's load, "
                   "compile, first step, decode, MP4 (seconds since process start)")  # fmt: skip
    add_engine_flags(p)
    pool = p.add_argument_group("many prompts on many GPUs")
    pool.add_argument("--gpus", default=None, metavar="LIST",
                      help="with --prompts-file: one worker per GPU (e.g. 0,1), that many lines at a time")  # fmt: skip
    pool.add_argument("--workers", type=int, default=None, metavar="N",
                      help="with --prompts-file: N worker processes without --gpus (e.g. on the CPU)")  # fmt: skip


# Subcommands registered by their own modules, with the help line `wanfast --help` shows without importing
# them (bench and compare pull in torch and plotting code).
_TOOLS = {
    "bench": ("wanfast.tools.bench", "time the engine against Diffusers on random weights"),
    "quantize": ("wanfast.tools.quantize", "write an FP8 (e4m3) copy of a checkpoint's DiT experts (lossy)"),
    "compare": ("wanfast.tools.compare", "PSNR / SSIM of video A against reference B (or two latent files)"),
    "serve": ("wanfast.server.cli", "run the HTTP service (see docs/server.md)"),
    "worker": ("wanfast.server.scale", "run a worker pool on a shared PostgreSQL job store, no HTTP"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``argv``, only the subcommand it names is built for real (the others are a
    help line each), so `wanfast --help` and `wanfast generate ...` import none of the tools."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="wanfast", description="Fast Wan2.2 video generation (text / image to video)"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    chosen = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for name, (module, help_) in _TOOLS.items():
        if argv is None or chosen == name:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_)
    return parser


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        return args.prompt_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read prompt file {args.prompt_file}: {e}") from e


def _overrides(args: argparse.Namespace) -> dict:
    """The sampling overrides the flags give (None: not given); ``specs.resolve_params`` applies them."""
    return dict(
        negative_prompt=args.negative_prompt, size=args.size, frames=args.frames, steps=args.steps,
        seed=args.seed, solver=args.solver, shift=args.shift, guidance=args.guidance,
        guidance_high_noise=args.guidance_high_noise, guidance_low_noise=args.guidance_low_noise,
        boundary=args.boundary, cfg_steps=args.cfg_steps, step_cache_threshold=args.step_cache,
        sampling_preset=args.sampling_preset,
    )  # fmt: skip


def _summary(result, fps: int, output: Path) -> str:
    t = result.timings
    rows = [("text encoding", f"{t.get('text_encoding', 0):.2f} s")]
    if t.get("conditioning", 0) >= 0.005:
        rows.append(("image encoding", f"{t['conditioning']:.2f} s"))
    for name, n in result.steps_per_expert.items():
        if n:
            secs = t.get(f"denoise_{name}", 0.0)
            label = "DiT" if name == "dit" else f"{name.replace('_', '-')} expert"
            rows.append((label, f"{n} step{'s' * (n != 1)}, {secs:.2f} s ({secs / n:.2f} s/step)"))
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


def out_of_memory_message(source, params: SamplingParams, device: str) -> str:
    """What a user reads after an out-of-memory error: the memory mode that would fit this request."""
    import torch

    from wanfast.accel.offload import MemoryBudgetError, choose_mode

    # The card's total memory: after the failure, "free" mostly reflects our own resident weights.
    free = torch.cuda.mem_get_info(torch.device(device))[1] if torch.device(device).type == "cuda" else 0
    size = (params.width, params.height)
    try:
        mode = choose_mode(source, size, params.frames, free, requested=None)
    except MemoryBudgetError as e:
        return f"out of GPU memory: {e}"
    return f"out of GPU memory, although the estimate fits ({mode or 'resident'}); try --offload blocks"


def _progress_for(args: argparse.Namespace, rank: int):
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

    return progress_for


def _on_stage(args: argparse.Namespace, rank: int):
    def on_stage(name: str) -> None:
        if rank == 0 and not args.no_progress and name == "vae_decode":
            print("decoding the video (VAE) ...", file=sys.stderr, flush=True)

    return on_stage


def generate(args: argparse.Namespace) -> int:
    if args.timings is not None:
        from wanfast import timeline

        timeline.start()
        import torch  # noqa: F401  (the imports, timed as one span from process start)

        import wanfast.builder
        import wanfast.pipeline  # noqa: F401

        timeline.mark("imports")
    from wanfast.builder import open_model, plan

    # The model's spec from the checkpoint's config files (no weights), then every request field (every
    # line of a prompts file, every image) is validated before any weights load.
    model = open_model(args.model or args.ckpt_dir)
    spec = model.spec
    items, params, image = None, None, None
    if args.prompts_file is not None:
        from wanfast.batch import read_prompts_file

        items = read_prompts_file(args.prompts_file, _overrides(args), spec, args.output, args.save_latents,
                                  args.image)  # fmt: skip
        sizes = [(i.params.width, i.params.height, i.params.frames) for i in items]
        if args.gpus is not None or args.workers is not None:  # the lines spread over a worker pool
            from wanfast.server.batchpool import run_on_pool
            from wanfast.video import STREAM_ENV

            if args.no_stream_mp4:  # the pool's workers read the switch from the environment they inherit
                os.environ[STREAM_ENV] = "0"

            return run_on_pool(args, items, args.fps or spec.defaults.fps)
    else:
        if args.image is not None:
            from wanfast.image import load_image

            image = load_image(args.image)
        params = spec_params(spec, _read_prompt(args), image, _overrides(args))
        sizes = [(params.width, params.height, params.frames)]
    bp = plan(model, engine_settings(args), sizes)  # attention, split and memory checked: still no weights
    if args.timings is not None:
        from wanfast import timeline

        timeline.mark("planned")

    import torch

    from wanfast.builder import build
    from wanfast.parallel import init_distributed

    rank, local_rank = init_distributed()  # torchrun: join the group (no-op in a plain run)
    if bp.settings.device == "cuda" and torch.distributed.is_initialized():
        from dataclasses import replace

        bp = replace(bp, settings=replace(bp.settings, device=f"cuda:{local_rank}"))
    if bp.memory_note and rank == 0:
        print(bp.memory_note, file=sys.stderr)
    pipe = build(bp)
    if args.timings is not None:
        from wanfast import timeline

        timeline.mark("built", sync=True)
    if rank == 0:
        from wanfast import attention

        own = attention.active_self_attention_backend()
        extra = f", self-attention {own}" if own != attention.active_backend() else ""
        print(f"model: {spec.name}; attention backend: {attention.active_backend()}{extra}", file=sys.stderr)

    from wanfast.video import Mp4Writer, finish_mp4, stream_mp4_enabled

    def write(result, output: Path, latents: Path | None, fps: int, writer: Mp4Writer | None = None) -> None:
        finish_mp4(writer, result.frames, output, fps)  # streamed: only the encoder's tail is left here
        if latents is not None:
            from safetensors.torch import save_file

            latents.parent.mkdir(parents=True, exist_ok=True)
            save_file({"latents": result.latents.contiguous()}, str(latents))

    fps = args.fps or spec.defaults.fps
    # the process that writes the file encodes it meanwhile, unless --no-stream-mp4 / WANFAST_STREAM_MP4=0
    stream = rank == 0 and not args.no_stream_mp4 and stream_mp4_enabled()
    progress_for, on_stage = _progress_for(args, rank), _on_stage(args, rank)
    if args.timings is not None:
        from wanfast.timeline import timed_progress

        progress_for = timed_progress(progress_for)
    if items is not None:
        from wanfast.batch import run_batch

        def write_item(result, item, item_fps: int, writer: Mp4Writer | None = None) -> None:
            write(result, item.output, item.latents, item_fps, writer)

        def open_writer(item, item_fps: int) -> Mp4Writer:
            return Mp4Writer(item.output, item.params.width, item.params.height, fps=item_fps)

        rc = run_batch(pipe, items, fps, write_item, progress_for, rank, on_stage,
                       open_writer if stream else None)  # fmt: skip
        if args.timings is not None and rank == 0:
            from wanfast.timeline import write_timings

            write_timings(args.timings, args, bp, None)
        return rc
    # Streamed: the writer takes the frames as the VAE decodes them (a failed run deletes its partial file
    # and leaves --output as it was); the write after the run is then only the encoder's tail.
    writer = Mp4Writer(args.output, params.width, params.height, fps=fps) if stream else None
    try:
        result = pipe.run(params, progress_for(params), image=image, on_stage=on_stage,
                          frames_sink=writer.add if writer is not None else None)  # fmt: skip
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if isinstance(e, torch.OutOfMemoryError):
            raise ConfigError(out_of_memory_message(pipe, params, bp.settings.device)) from e
        raise
    if rank != 0:  # every rank holds the same result; only rank 0 writes
        return 0
    if args.timings is not None:
        from wanfast import timeline

        timeline.mark("run_end")  # --timings' write_mp4: from here (the decode's end) to the file closed
    write(result, args.output, args.save_latents, fps, writer)
    if args.timings is not None:
        from wanfast.timeline import write_timings

        write_timings(args.timings, args, bp, result)
    print(_summary(result, fps, args.output))
    return 0


def spec_params(spec, prompt: str, image, overrides: dict) -> SamplingParams:
    """``specs.resolve_params`` with the image's size when there is one."""
    from wanfast.specs import resolve_params

    return resolve_params(spec, prompt, image_size=image.size if image is not None else None, **overrides)


# Optional packages by the extra that installs them: a missing one is a one-line hint, not a traceback.
_EXTRAS = {"uvicorn": "serve", "fastapi": "serve", "pydantic": "serve", "matplotlib": "bench", "diffusers": "bench",
           "flash_attn_interface": "hopper", "fa3_fwd": "hopper", "psycopg": "postgres"}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"wanfast: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = _EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"wanfast: error: {e.name} is not installed: pip install 'wanfast[{extra}]'", file=sys.stderr)
        return 2
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # a torchrun launch: leave the group cleanly
