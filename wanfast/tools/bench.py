"""``wanfast bench``: what a user waits for, on the real architecture with random weights (no download).

Times one DiT forward, one denoising step (both guidance passes and the solver step), text encoding, the
VAE decode and a whole generation, with peak memory, for each engine setting of ``--compare`` and, in the
same process, for Diffusers (``wanfast.tools.bench_peer``). A 40-step 720p generation takes ~15 min per engine on
an H200, so besides the measured ``--steps N`` generation the bench reports a *composed* estimate,
text encoding + ``--composed-steps`` x median step + VAE decode, each term measured in this run. Every
number in the JSON says whether it was measured or composed. Output: a table, JSON and a PNG bar chart
(composed, annotated and drawn by ``wanfast.tools.bench_report``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from wanfast.config import COMPILE_MODES, ConfigError, EngineSettings, SamplingParams, parse_dtype
from wanfast.specs import SPECS, ModelSpec, parse_size, resolve_params
from wanfast.tools.bench_report import (
    COMPOSED,
    WHATS,
    _gib,
    _vae_row,
    annotate_ratios,
    compose,
    engine_json,
    environment,
    format_table,
    write_png,
)

# The --compare ladder: each rung adds its switches to every rung before it, starting from plain eager.
LADDER: tuple[tuple[str, dict], ...] = (
    ("eager", {}),
    ("fused", {"fuse_projections": True}),
    ("cross_kv", {"cache_cross_kv": True}),
    ("rope", {"cache_rope": True}),
    ("compiled", {"compile": True}),
    ("graphs", {"cuda_graphs": True}),
)
ENGINES = (*(name for name, _ in LADDER), "default")  # default: EngineSettings(), what `generate` runs
PROMPT = "a red fox trotting through fresh snow in a pine forest at dawn, cinematic, slow motion"


def engine_settings(name: str, base: EngineSettings) -> EngineSettings:
    if name == "default":
        return base
    settings = base.plain()
    for rung, switches in LADDER:
        settings = replace(settings, **switches)
        if rung == name:
            return settings
    raise ConfigError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")


@dataclass(frozen=True)
class Engine:
    name: str
    impl: str  # "wanfast" or "diffusers"
    settings: EngineSettings | None = None  # None for Diffusers


@dataclass
class Plan:
    """One validated invocation: every argument is checked here, before any model is built."""

    preset: ModelSpec
    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    params: dict[str, SamplingParams]  # "WxH" -> the measured generation's request at that size
    engines: list[Engine]  # --compare
    gen_engines: list[Engine]  # --compare, plus the eager reference that --check needs
    peer: bool


def make_plan(args: argparse.Namespace) -> Plan:
    preset = SPECS[args.model]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} requested but CUDA is not available; use --device cpu")
    if args.check and "generate" not in args.what:
        raise ConfigError(
            "--check compares the final latents of measured generations: add generate to --what"
        )
    if not args.compare and (args.peer == "none" or args.check):
        raise ConfigError("--compare none times the peer alone: it needs a peer and no --check")
    if args.repeats < 1 or args.warmup < 0 or args.gen_repeats < 1 or args.composed_steps < 1:
        raise ConfigError("--repeats, --gen-repeats and --composed-steps must be >= 1, --warmup >= 0")
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    vae_dtype = parse_dtype(args.vae_dtype) if args.vae_dtype else dtype
    sizes = args.sizes or [preset.defaults.size, *([(1280, 720)] if args.model == "t2v-A14B" else [])]
    overrides = dict(
        frames=args.frames, steps=args.steps, seed=args.seed, sampling_preset=args.sampling_preset
    )
    params = {  # SamplingParams validates every size, the frame count and the step count
        # I2V: an image of that size (its area and aspect ratio give that size back)
        f"{w}x{h}": resolve_params(
            preset,
            PROMPT,
            image_size=(w, h) if preset.image == "required" else None,
            width=w,
            height=h,
            **overrides,
        )
        for w, h in sizes
    }
    base = EngineSettings(
        device=str(device), dtype=dtype, vae_dtype=vae_dtype, attention_backend=args.attention,
        self_attention_backend=args.self_attention, quant=args.quant, compile_mode=args.compile_mode,
        compile_cache=args.compile_cache, fp8_row_kernels=not args.no_fp8_row_kernels,
    )  # fmt: skip
    engines = [Engine(n, "wanfast", engine_settings(n, base)) for n in args.compare]
    gen_engines = list(engines)
    if args.check and not any(e.settings == e.settings.plain() for e in engines):
        gen_engines.insert(0, Engine("eager", "wanfast", base.plain()))
    return Plan(preset, device, dtype, vae_dtype, params, engines, gen_engines, _resolve_peer(args.peer))


def _resolve_peer(peer: str) -> bool:
    from wanfast.tools.bench_peer import version

    if peer == "none":
        return False
    if version() is None:
        if peer == "diffusers":
            raise ConfigError("--peer diffusers: diffusers is not importable here (pip install diffusers)")
        _log("DIFFUSERS IS NOT INSTALLED: no peer and no ratios (pip install diffusers, or pass --peer none)")
        return False
    return True


def _release() -> None:
    """Frees the last engine's models: compiled graphs keep their modules alive until dynamo is reset."""
    gc.collect()
    if "torch._dynamo" in sys.modules:  # importing it only to reset it costs seconds
        torch._dynamo.reset()
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _warm_params(params: SamplingParams) -> SamplingParams:
    """A 2-step request whose boundary falls between its two timesteps, so warm-up runs both experts
    (compiling or first-calling the low-noise expert must not land in the measured run)."""
    from wanfast.solvers import make_solver

    ts = make_solver(params.solver, 2, params.shift).timesteps.tolist()
    return params.with_(steps=2, boundary=(ts[0] + ts[1]) / 2000)  # (a one-DiT model ignores it)


class Bench:
    """Runs a plan's measurements, one set of models on the device at a time, and collects the records."""

    def __init__(self, plan: Plan, args: argparse.Namespace) -> None:
        from wanfast.tools.bench_peer import Clock, DiffusersSide, WanfastSide, make_inputs

        self.plan, self.args, self.clock = plan, args, Clock(plan.device)
        side_args = (plan.preset, plan.device, plan.dtype, plan.vae_dtype, args.seed)
        ours = WanfastSide(*side_args)
        peer = [(DiffusersSide(*side_args), Engine("diffusers", "diffusers"))] if plan.peer else []
        self.text_runs = [(ours, Engine("wanfast", "wanfast"))] + peer
        vae_settings = {e.settings.optimize_vae: e.settings for e in plan.engines}  # the only VAE switch
        self.vae_runs = [(ours, Engine(_vae_row(s), "wanfast", s)) for s in vae_settings.values()] + peer
        self.dit_runs = [(ours, e) for e in plan.engines] + peer
        self.gen_runs = [(ours, e) for e in plan.gen_engines] + peer
        self.inputs = {
            k: make_inputs(plan.preset, p, plan.device, plan.dtype) for k, p in plan.params.items()
        }
        self.records: list[dict] = []
        self.latents: dict[tuple[str, str], torch.Tensor] = {}

    def add(self, engine: Engine, what: str, size: str | None, data: dict, **extra) -> None:
        frames = self.plan.params[size].frames if size else None
        rec = {"engine": engine.name, "impl": engine.impl, "what": what, "size": size, "frames": frames}
        self.records.append({**rec, "kind": "measured", **extra, **data})
        _log(
            f"{engine.name} {what} {size or ''}: {data['seconds']:.4f} s, {_gib(data['peak_memory_bytes'])} GiB"
        )

    def text(self, side, engine: Engine) -> None:
        """Text encoding (prompt and negative prompt), once per implementation: no engine switch touches it."""
        te, a = side.build_text(), self.args
        fn = side.text(te, PROMPT, self.plan.preset.defaults.negative_prompt)
        self.add(engine, "text", None, self.clock.sample(fn, a.warmup, a.repeats))
        del te, fn
        _release()

    def vae(self, side, engine: Engine) -> None:
        """VAE decode of the normalised latents of every size."""
        vae, a = side.build_vae(engine.settings), self.args
        for size, inp in self.inputs.items():
            self.add(engine, "vae", size, self.clock.sample(side.vae(vae, inp), a.warmup, a.repeats))
        del vae
        _release()

    def dit(self, side, engine: Engine) -> None:
        """One expert: a forward with the prompt, then steps of the real denoising loop."""
        a = self.args
        dit = side.build_dit(engine.settings)
        for size, inp in self.inputs.items():
            if "forward" in a.what:
                sample = self.clock.sample(side.forward(dit, inp), a.warmup, a.repeats)
                self.add(engine, "forward", size, sample, tokens=inp.x[0, 0].numel() // 4)  # 1x2x2 patches
            if "step" in a.what:  # no local keeps the loop (and so the model) alive past this method
                steps = self.clock.steps(side.steps(dit, inp, self.plan.params[size]), a.warmup, a.repeats)
                self.add(engine, "step", size, steps)
        del dit
        _release()

    def generation(self, side, engine: Engine) -> None:
        """The whole pipeline: a 2-step warm-up generation (if --warmup), then the measured one(s)."""
        a = self.args
        pipe = side.build_pipeline(engine.settings)
        for size, params in self.plan.params.items():
            warm = [side.generate(pipe, _warm_params(params), self.clock)["seconds"]] if a.warmup else []
            runs = [side.generate(pipe, params, self.clock) for _ in range(a.gen_repeats)]
            self.latents[(engine.name, size)] = runs[-1].pop("latents")
            stages = {k: statistics.median(r["stages_s"][k] for r in runs) for k in runs[0]["stages_s"]}
            data = {
                "seconds": statistics.median(r["seconds"] for r in runs),
                "times_s": [r["seconds"] for r in runs],
                "warmup_times_s": warm,
                "peak_memory_bytes": max((r["peak_memory_bytes"] or 0) for r in runs) or None,
                "stages_s": stages,
                "step_times_s": [t for r in runs for t in r["step_times_s"]],
                "steps_per_expert": runs[0].get("steps_per_expert"),
            }
            self.add(engine, "generate", size, data, steps=params.steps)
        del pipe
        _release()

    def checks(self) -> list[dict]:
        """Relative error of each engine's final latents against the plain engine's (same weights, seed)."""
        if not self.args.check:
            return []
        engines = self.plan.gen_engines
        ref = next(e for e in engines if e.settings == e.settings.plain())
        out = []
        for e in (e for e in engines if e is not ref):
            for size, params in self.plan.params.items():
                a, b = self.latents[(e.name, size)], self.latents[(ref.name, size)]
                err = float((a - b).norm() / b.norm())
                tol = self.args.check_tol
                out.append({"engine": e.name, "reference": ref.name, "size": size, "steps": params.steps,
                            "relative_error": err, "tolerance": tol, "ok": err <= tol})  # fmt: skip
        return out

    def run(self) -> dict:
        what = set(self.args.what)
        with torch.inference_mode():
            for side, engine in self.text_runs if "text" in what else []:
                self.text(side, engine)
            for side, engine in self.vae_runs if "vae" in what else []:
                self.vae(side, engine)
            for side, engine in self.dit_runs if what & {"forward", "step"} else []:
                self.dit(side, engine)
            for side, engine in self.gen_runs if "generate" in what else []:
                self.generation(side, engine)
        engines = [e for _, e in self.gen_runs]
        self.records += compose(self.records, engines, list(self.plan.params), self.args.composed_steps)
        annotate_ratios(self.records, self.plan.engines[0].name if self.plan.engines else "diffusers")
        return {
            "tool": "wanfast bench",
            "schema": 1,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(self.plan.device),
            "config": _config(self.plan, self.args),
            "engines": [engine_json(s, e) for s, e in self.gen_runs],
            "measurements": self.records,
            "checks": self.checks(),
            "notes": [
                "kind 'measured': timed in this run; seconds = median of times_s (after warmup_times_s)",
                "kind 'composed': " + COMPOSED.format(n=self.args.composed_steps) + "; not a run",
                "text rows are per implementation (no engine switch changes the text encoder); vae rows per "
                "implementation and optimize_vae setting ('wanfast' on, 'wanfast-plain-vae' off)",
                "weights are random: speed does not depend on their values",
            ],
        }


def run_bench(args: argparse.Namespace) -> dict:
    """Every measurement of one invocation as a JSON-ready dict (``bench_main`` prints and writes it)."""
    from wanfast import attention

    plan = make_plan(args)
    backend = attention.set_backend(args.attention, plan.device)
    report = Bench(plan, args).run()
    report["environment"]["attention_backend"] = backend
    return report


def _config(plan: Plan, args: argparse.Namespace) -> dict:
    first = next(iter(plan.params.values()))
    return {"model": plan.preset.name, "sizes": list(plan.params), "frames": first.frames, "steps": first.steps,
            "composed_steps": args.composed_steps, "what": args.what, "compare": args.compare,
            "repeats": args.repeats,
            "warmup": args.warmup, "gen_repeats": args.gen_repeats, "dtype": str(plan.dtype),
            "vae_dtype": str(plan.vae_dtype), "seed": args.seed, "prompt": PROMPT, "quant": args.quant,
            "self_attention": args.self_attention, "compile_mode": args.compile_mode,
            "fp8_row_kernels": not args.no_fp8_row_kernels}  # fmt: skip


def _names(choices: tuple[str, ...], allow_none: bool = False) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        if allow_none and text.strip() == "none":
            return []
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items or any(s not in choices for s in items) or len(set(items)) != len(items):
            raise argparse.ArgumentTypeError(
                f"{text!r}: give a comma-separated list, no repeats, of {', '.join(choices)}"
            )
        return items

    return parse


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [parse_size(s) for s in text.split(",")]  # the one size parser
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: sizes are WIDTHxHEIGHT[,WIDTHxHEIGHT...], e.g. 832x480,1280x720"
        ) from None


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``bench`` to a CLI's subparsers; the parsed namespace runs with ``args.func(args)``."""
    p = subparsers.add_parser("bench", help="time the engine against Diffusers on random weights",
                              description=__doc__.split("\n\n")[0])  # fmt: skip
    p.set_defaults(func=bench_main)
    add = p.add_argument
    add("--sampling-preset", default=None, metavar="NAME", help="e.g. lightning-4step (wanfast.presets)")
    add(
        "--model",
        choices=list(SPECS),
        default="t2v-A14B",
        help="the model whose dimensions are timed (tiny*: CPU-sized test models)",
    )
    add("--sizes", type=_sizes, help="WxH,... (default: 832x480,1280x720 for A14B, 64x48 for tiny)")
    add("--frames", type=int, help="frames, 4n+1 (default: the preset's, 81)")
    add("--what", type=_names(WHATS), default=list(WHATS), help=f"any of {','.join(WHATS)} (default: all)")
    add("--steps", type=int, help="steps of the measured generation (default: the preset's, 40)")
    add("--composed-steps", type=int, default=40, help="steps of the composed estimate (default 40)")
    add("--compare", type=_names(ENGINES, allow_none=True), default=["default"],
        help=f"engine settings to time, any of {','.join(ENGINES)}: each ladder rung adds one switch to the "
        "rungs before it (eager: all off); default: EngineSettings() (default: default); none: the peer "
        "alone (a run too long to hold both, merged later with benchmarks/merge_bench.py)")  # fmt: skip
    add("--peer", choices=["auto", "diffusers", "none"], default="auto",
        help="auto (default): Diffusers where importable, loudly skipped where not")  # fmt: skip
    add("--repeats", type=int, default=2, help="measured calls / steps; the median is reported (default 2)")
    add("--warmup", type=int, default=1,
        help="warm-up calls / steps (default 1); > 0 also runs a 2-step warm-up generation")  # fmt: skip
    add("--gen-repeats", type=int, default=1, help="measured generations per engine and size (default 1)")
    add("--device", help="default: cuda if available, else cpu")
    add("--dtype", help="DiT and text-encoder dtype (default: bf16 on GPU, fp32 on CPU)")
    add("--vae-dtype", help="VAE dtype of both implementations (default: --dtype)")
    add("--attention", default="auto", help="wanfast's attention backend (default: auto)")
    add("--self-attention", default=None, metavar="BACKEND",
        help="wanfast's self-attention backend, e.g. the lossy sage8 (default: --attention)")  # fmt: skip
    add("--quant", choices=["fp8"], default=None, help="lossy: FP8 e4m3 DiT linears in every wanfast engine")
    add("--no-fp8-row-kernels", action="store_true", help="FP8 linears quantise their input with torch ops")
    add("--compile-mode", choices=COMPILE_MODES, default=None,
        help="inductor tuning of every compiled wanfast engine (default: inductor's defaults)")  # fmt: skip
    add("--compile-cache", default=None, metavar="DIR", help="torch.compile artifacts kept in DIR and reused")
    add("--seed", type=int, default=0)
    add("--check", action="store_true", help="relative error of each engine's final latents vs eager")
    add("--check-tol", type=float, default=2e-2, help="--check exits 1 above this (default 2e-2)")
    add("--json", type=Path, default=Path("wanfast-bench.json"), help="default: wanfast-bench.json")
    add("--png", type=Path, default=Path("wanfast-bench.png"), help="default: wanfast-bench.png")
    return p


def bench_main(args: argparse.Namespace) -> int:
    """Runs the bench; prints the table, writes the JSON and the PNG. Exit 1 if a --check fails."""
    report = run_bench(args)
    print(format_table(report), flush=True)
    report["png_error"] = write_png(report, args.png)
    report["png"] = None if report["png_error"] else str(args.png)
    if report["png_error"]:
        print(f"wanfast bench: NO PNG WRITTEN: {report['png_error']}", file=sys.stderr)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}" + (f" and {args.png}" if report["png"] else ""))
    return 0 if all(c["ok"] for c in report["checks"]) else 1
