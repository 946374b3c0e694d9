"""The one builder: (model source, engine settings) -> a ready ``WanPipeline``.

Every entry point (the CLI, ``wanfast.load_pipeline``, the server's workers, ``bench``) goes through it, in
two steps:

1. ``plan(source, settings, sizes)`` decides everything that needs no weights, so bad input fails before a
   byte is read: the model spec and checkpoint paths (``loading.layout.detect``, or a spec name for a tiny
   random-weight model), the settings resolved (device, dtypes), the attention backends checked available
   on that device, the multi-GPU split checked against the model's heads, and the memory mode picked for
   the largest of the requests to come (``memory.plan_memory``).
2. ``build(plan)`` loads each component once and applies, in this order: LoRA (merged into the plain
   weights), ``accel.optimize_pipeline`` (fusion, FP8, caches, compile; the VAE decode rewrite), the
   multi-GPU split (``parallel.parallelize``), then the memory mode (``accel.offload.apply_offload``:
   after accel, which decides which weight tensors exist).

With ``BuildPlan.overlap_load`` (``overlap_rule``) the low-noise expert of a two-expert model is not
loaded here: the pipeline is returned with a deferred entry, whose load (read, LoRAs, then the same
``accel.optimize_dit``, in a thread) starts after the first step and runs beside the high-noise steps that
follow; the sampling loop waits for it at the boundary if it is not there yet (``wanfast.experts``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from wanfast.config import ConfigError, EngineSettings
from wanfast.experts import Experts
from wanfast.loading.layout import CheckpointPaths, detect, is_fp8_checkpoint
from wanfast.specs import SPECS, ModelSpec, get_spec

log = logging.getLogger("wanfast.builder")


@dataclass(frozen=True)
class ModelSource:
    """A model to build: its spec and, for a checkpoint, its paths (None: a tiny random-weight model)."""

    spec: ModelSpec
    paths: CheckpointPaths | None = None
    fp8_checkpoint: bool = False


def open_model(source: str | os.PathLike | ModelSpec | ModelSource) -> ModelSource:
    """The spec (and paths) of a checkpoint folder, a spec or the name of a spec (a tiny model); config
    files and tensor headers only."""
    if isinstance(source, ModelSource):
        return source
    if isinstance(source, ModelSpec):
        return ModelSource(source)
    if isinstance(source, str) and source in SPECS:
        return ModelSource(get_spec(source))
    spec, paths = detect(source)
    return ModelSource(spec, paths, is_fp8_checkpoint(paths.first_expert))


@dataclass(frozen=True)
class BuildPlan:
    """What ``build`` will do, decided without reading weights."""

    spec: ModelSpec
    paths: CheckpointPaths | None  # None: a tiny random-weight model, written from ``spec`` when built
    settings: EngineSettings  # resolved; ``offload`` as the memory plan picked it
    memory_note: str | None = None  # the memory plan's reason, for a log line
    fp8_checkpoint: bool = False
    seed: int = 0  # the random weights of a tiny model
    overlap_load: bool = False  # the low-noise expert loads after the first step (``overlap_rule``)

    @property
    def split(self) -> bool:
        return self.settings.split


def check_attention(settings: EngineSettings) -> None:
    """Both attention slots resolvable on the device (``--attention flash3`` on a CPU fails here, before
    any weights load, with the backends that are available)."""
    from wanfast import attention

    try:
        attention.resolve_backend(settings.attention_backend, settings.device)
        if settings.self_attention_backend is not None:
            attention.resolve_backend(settings.self_attention_backend, settings.device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def plan(
    source: str | os.PathLike | ModelSpec | ModelSource,
    settings: EngineSettings | None = None,
    sizes: Sequence[tuple[int, int, int]] | None = None,
    seed: int = 0,
) -> BuildPlan:
    """Step 1 (module docstring). ``source``: a checkpoint folder, a spec (or spec name) of a tiny model, or
    an ``open_model`` result;
    ``sizes``: (width, height, frames) of the requests to come, for the memory plan (default: the model's
    default request)."""
    from wanfast.memory import plan_memory

    settings = (settings or EngineSettings()).resolved()
    model = open_model(source)
    spec, paths, fp8 = model.spec, model.paths, model.fp8_checkpoint
    check_attention(settings)
    if settings.split:
        from wanfast.parallel import parallel_settings
        from wanfast.parallel.dist import check_split

        world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; a group joined by hand says its own
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
        check_split(
            settings.cfg_parallel, settings.ulysses, world, spec.dit.num_heads, settings.ulysses_chunks
        )
        settings = parallel_settings(settings)
    if settings.lora_stack():
        from wanfast.loading.lora import check_lora_files, check_lora_settings

        check_lora_settings(settings)
        low_only = [
            x.path for x in settings.lora_stack() if x.strength_low_noise and not x.strength_high_noise
        ]
        if (
            not spec.two_experts and low_only
        ):  # it would be dropped without a word: the DiT takes the high one
            raise ConfigError(
                f"{spec.name} has one DiT, which takes the high-noise strength: {', '.join(low_only)} has only "
                "a low-noise one (--lora FILE:STRENGTH, or --lora-high-noise)"
            )
        if fp8:
            raise ConfigError("LoRAs merge into bf16/fp32 weights: load the bf16 checkpoint with --quant fp8")
        check_lora_files(settings.lora_stack(), spec, settings.lora_merge)  # before any weights load
    d = spec.defaults
    sizes = sizes or [(*d.size, d.frames)]
    settings, why = plan_memory(settings, spec, sizes, fp8)
    overlap = overlap_rule(settings, spec, sizes, fp8, paths is not None)
    return BuildPlan(spec, paths, settings, why, fp8, seed, overlap)


def overlap_rule(
    settings: EngineSettings,
    spec: ModelSpec,
    sizes: Sequence[tuple[int, int, int]],
    fp8_checkpoint: bool,
    from_checkpoint: bool,
) -> bool:
    """Whether the low-noise expert loads beside the high-noise steps: ``settings.overlap_load`` (the off
    switch), a two-expert model read from a checkpoint (a tiny model's files are gone after the build),
    both experts resident (a memory mode places and streams all experts at once) and no multi-GPU split
    (which splits every expert); and when accel quantises a bf16 checkpoint, room for that expert's bf16
    weights beside the first steps' activations (``memory.overlap_load_peak``)."""
    from wanfast.memory import overlap_load_peak

    if (
        not (settings.overlap_load and spec.two_experts and from_checkpoint)
        or settings.offload
        or settings.split
    ):
        return False
    room = overlap_load_peak(settings, spec, sizes, fp8_checkpoint)
    if room is not None and room[0] > room[1]:
        log.info(
            "the low-noise expert loads before the first step: loaded during it in bf16 beside the activations "
            "it would need ~%.1f GiB of %.1f", room[0] / 2**30, room[1] / 2**30,
        )  # fmt: skip
        return False
    return True


def _load_dit(path: Path, device: str, settings: EngineSettings):
    if is_fp8_checkpoint(path):  # written by `wanfast quantize`: built fused, FP8 linears
        from wanfast.accel.fp8_checkpoint import load_fp8_transformer

        return load_fp8_transformer(path, device, settings.dtype)
    from wanfast.loading.layout import load_transformer

    return load_transformer(path, device, settings.dtype)


def _load_expert(name: str, path: Path, device: str, s: EngineSettings):
    """One expert, its LoRAs merged (or wrapped) on the plain model, before accel fuses q/k/v; a merge
    sums in float32 from the checkpoint's own values, then casts."""
    from wanfast.loading.lora import apply_loras, checkpoint_source, expert_strengths

    dit = _load_dit(path, device, s)
    stack = expert_strengths(s.lora_stack(), name)  # "dit" (one-DiT model) takes the high-noise strengths
    if stack:
        apply_loras(dit, stack, s.lora_merge, checkpoint_source(path) if s.lora_merge else None)
    return dit


def _load_during_steps(name: str, path: Path, s: EngineSettings) -> Future:
    """Start loading expert ``name`` in a thread of its own: read, LoRAs, then ``accel.optimize_dit`` as
    ``assemble`` gives the others (the attention backend left as the main thread chose it). On CUDA its
    work runs on a stream of its own on the settings' device, so neither its kernels nor its spans' syncs
    wait for the steps queued meanwhile on the default stream; the stream is synchronised before the Future
    completes, so the steps may use the weights at once."""
    from wanfast import timeline
    from wanfast.accel import optimize_dit

    device = torch.device(s.device)
    if device.type == "cuda" and device.index is None:  # a new thread's current device is 0, not ours
        device = torch.device("cuda", torch.cuda.current_device())

    def job():
        with ExitStack() as ctx:
            if device.type == "cuda":
                ctx.enter_context(torch.cuda.device(device))
                stream = torch.cuda.Stream(device)
                ctx.enter_context(torch.cuda.stream(stream))
            with timeline.span(f"load_expert_{name}", timeline.files_bytes(path)):
                dit = _load_expert(name, path, str(device), s)
            with timeline.span(f"accel_{name}"):  # optimize_pipeline chose the attention backend
                dit = optimize_dit(dit, s, choose_backend=False)
            if device.type == "cuda":
                stream.synchronize()
                if s.quant:  # the bf16 weights quantised away stay cached in this stream's pool otherwise
                    torch.cuda.empty_cache()
        return dit

    pool = ThreadPoolExecutor(1, thread_name_prefix=f"wanfast-{name}")
    try:
        return pool.submit(job)
    finally:
        pool.shutdown(wait=False)  # the thread ends with the job


def _write_tiny(spec: ModelSpec, folder: Path, seed: int) -> CheckpointPaths:
    from wanfast.loading.layout import detect as detect_folder
    from wanfast.tools.testing import write_official_checkpoint

    write_official_checkpoint(folder, spec, seed=seed)
    return detect_folder(folder)[1]


def _parallel_load() -> bool:
    """The text encoder loads in a thread beside the experts (file reads and copies release the GIL);
    ``WANFAST_LOAD_THREADS=0`` loads one component after the other."""
    return os.environ.get("WANFAST_LOAD_THREADS", "1") != "0"


def build(p: BuildPlan):
    """Step 2 (module docstring): the ready ``WanPipeline``."""
    from wanfast import timeline
    from wanfast.loading.layout import dit_config, load_text_encoder, load_vae
    from wanfast.loading.text_encoder import import_backend
    from wanfast.memory import enforce_memory_budget

    if p.memory_note:
        log.info("%s", p.memory_note)
    s = p.settings
    enforce_memory_budget(s)
    with tempfile.TemporaryDirectory(prefix="wanfast-tiny-") as tmp:  # a tiny model's files, gone after load
        with timeline.span("write_tiny_model"):
            paths = p.paths or _write_tiny(p.spec, Path(tmp), p.seed)
        te_device = s.text_encoder_device or s.device
        text_len = dit_config(paths.first_expert)[0].text_len  # the checkpoint's config, as the expert's

        def text_encoder():
            nbytes = timeline.files_bytes(paths.text_encoder)
            with timeline.span("load_text_encoder", nbytes):
                return load_text_encoder(paths.text_encoder, paths.tokenizer, te_device, s.dtype, text_len)

        # With an offload mode the experts load into CPU memory; apply_offload then puts on the device only
        # what that mode keeps there, so loading never needs both experts on the GPU at once.
        expert_device = "cpu" if s.offload else s.device
        with timeline.span("import_text_encoder"):
            import_backend()  # here, not in the thread: see its docstring
        later = tuple(paths.experts)[-1] if p.overlap_load else None  # the low-noise expert
        with ThreadPoolExecutor(1, thread_name_prefix="wanfast-load") as pool:
            te_future = pool.submit(text_encoder) if _parallel_load() else None
            experts = Experts()
            for name, path in paths.experts.items():
                if name == later:  # read once the first step has run (wanfast.experts)
                    experts.defer(name, partial(_load_during_steps, name, path, s))
                    continue
                with timeline.span(f"load_expert_{name}", timeline.files_bytes(path)):
                    experts[name] = _load_expert(name, path, expert_device, s)
            te = te_future.result() if te_future is not None else text_encoder()
        with timeline.span("load_vae", timeline.files_bytes(paths.vae)):
            vae = load_vae(paths.vae, s.device, s.vae_dtype)
    with timeline.span("accel"):
        return assemble(p.spec, te, experts, vae, s)


def assemble(spec: ModelSpec, text_encoder, experts: dict, vae, settings: EngineSettings):
    """Loaded (or random-weight, ``tools.synthetic``) components -> the ready ``WanPipeline``: accel, then
    the multi-GPU split, then the memory mode (module docstring). ``settings`` must be resolved."""
    from wanfast.accel import compiles, optimize_pipeline
    from wanfast.pipeline import WanPipeline

    pipe = optimize_pipeline(WanPipeline(spec, text_encoder, experts, vae, settings))
    if compiles(settings) and settings.compile_cache:  # before the first forward compiles anything
        from wanfast.accel.compile_cache import compile_cache_for
        from wanfast.accel.fp8 import fp8_modules

        fp8 = any(fp8_modules(e) for e in pipe.experts.ready().values())  # the experts are alike
        pipe.compile_cache = compile_cache_for(spec.name, settings, fp8)
    if settings.split:
        from wanfast.parallel import parallelize

        parallelize(pipe)
    if settings.offload:
        from wanfast.accel.offload import apply_offload

        apply_offload(pipe)
    return pipe


def build_pipeline(
    source: str | os.PathLike | ModelSpec | ModelSource,
    settings: EngineSettings | None = None,
    sizes: Sequence[tuple[int, int, int]] | None = None,
    seed: int = 0,
):
    """``build(plan(...))``."""
    return build(plan(source, settings, sizes, seed))


def settings_for(
    device: str | torch.device | None = None,
    dtype=None,
    vae_dtype=None,
    text_encoder_device: str | torch.device | None = None,
    **switches: object,
) -> EngineSettings:
    """``EngineSettings`` from the common keyword arguments (None: the resolved default)."""
    from wanfast.config import parse_dtype

    return EngineSettings(
        device=str(device) if device is not None else None,
        dtype=parse_dtype(dtype) if dtype is not None else None,
        vae_dtype=parse_dtype(vae_dtype) if vae_dtype is not None else None,
        text_encoder_device=str(text_encoder_device) if text_encoder_device is not None else None,
        **switches,
    )
