"""Public entry points: ``load_pipeline`` and the tiny random-weight pipeline; the memory-budget plan
(``plan_memory``) shared by the CLI, this API and the server."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import replace

import torch

from wanfast.accel import optimize_pipeline
from wanfast.config import PRESETS, ConfigError, EngineSettings, ModelPreset, parse_dtype
from wanfast.loading.layout import (
    CheckpointLayout,
    detect_layout,
    dit_config,
    load_text_encoder,
    load_transformer,
    load_vae,
)
from wanfast.pipeline import WanPipeline

log = logging.getLogger("wanfast.api")
GiB = 1024**3


def model_preset(layout: CheckpointLayout | None) -> tuple[ModelPreset, bool]:
    """(architecture, whether the DiT checkpoint is already FP8) for a memory estimate, from config files
    only: the ``tiny`` preset for ``None`` or a tiny checkpoint, else ``t2v-A14B`` with the checkpoint's
    own DiT config."""
    if layout is None:
        return PRESETS["tiny"], False
    from wanfast.loading.fp8_checkpoint import is_fp8_checkpoint

    cfg = dit_config(layout.high_noise)[0]
    # the DiT's text_dim is the text encoder's width: 4096 for UMT5-XXL, the tiny one's for tiny checkpoints
    tiny = cfg.text_dim == PRESETS["tiny"].dit.text_dim
    base = PRESETS["tiny" if tiny else "t2v-A14B"]
    return replace(base, dit=cfg), is_fp8_checkpoint(layout.high_noise)


def _fmt(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


def plan_memory(
    settings: EngineSettings,
    preset: ModelPreset,
    sizes: Sequence[tuple[int, int, int]],
    fp8_checkpoint: bool = False,
) -> tuple[EngineSettings, str | None]:
    """With ``settings.memory_budget_gb``: the settings with ``offload`` set to the fastest memory mode
    (resident, then expert, then blocks) whose estimate (``accel.offload.estimate_memory``: DiT weights in
    ``settings.dtype``, FP8 with ``quant``, the text encoder only when it runs on the device) fits the
    budget for the largest of ``sizes`` ((width, height, frames) each), and the reason, for a log line.
    An explicit ``settings.offload`` is kept if it fits. Raises ``MemoryBudgetError`` naming what fits.
    Without a budget: ``(settings, None)``."""
    from wanfast.accel.offload import MODES, MemoryBudgetError, activation_bytes, choose_mode, estimate_memory

    if settings.memory_budget_gb is None:
        return settings, None
    if not settings.memory_budget_gb > 0:
        raise ConfigError(f"the memory budget must be > 0 GiB, got {settings.memory_budget_gb!r}")
    budget = int(settings.memory_budget_gb * GiB)
    kw = _estimate_kw(settings)
    te, te_on_device = settings.text_encoder_device, kw["text_encoder_on_device"]
    w, h, frames = max(sizes, key=lambda s: activation_bytes(preset, (s[0], s[1]), s[2]))
    need = {m: estimate_memory(preset, (w, h), frames, m, **kw) for m in (None, *MODES)}
    label = {None: "resident", "expert": "--offload expert", "blocks": "--offload blocks"}
    what = ", ".join(f"{label[m]} ~{_fmt(need[m])}" for m in need)
    where = "text encoder on " + ("the device" if te_on_device else str(te))
    head = f"memory budget {settings.memory_budget_gb:g} GiB, {w}x{h} x {frames} frames, {where}"
    head += f", {settings.quant}" if settings.quant else ""
    fits = [m for m in need if need[m] <= budget]
    try:
        mode = choose_mode(preset, (w, h), frames, budget, settings.offload or "auto", **kw)
    except MemoryBudgetError:
        if not fits:
            tips = ["a smaller size or fewer frames", "--quant fp8" * (not settings.quant)]
            tips += ["--t5-cpu" * te_on_device, "a larger budget"]
            hint = "nothing fits: use " + ", ".join(t for t in tips if t)
        else:
            hint = f"{label[fits[0]]} fits"
        asked = f"{label[settings.offload]} does not fit" if settings.offload else "no memory mode fits"
        raise MemoryBudgetError(f"{asked} ({head}): {what}; {hint}") from None
    why = "asked for, fits" if settings.offload else "the fastest that fits"
    if mode is None and settings.quant and not fp8_checkpoint:
        # the bf16 checkpoint loads both experts in bf16 before accel quantises them: that is the peak
        load_peak = estimate_memory(preset, (w, h), frames, None, **{**kw, "quant": None})
        if load_peak > budget:
            offload_fits = [m for m in MODES if need[m] <= budget]
            if not offload_fits:
                raise MemoryBudgetError(
                    f"no memory mode fits ({head}): resident needs ~{_fmt(load_peak)} while a bf16 "
                    f"checkpoint loads; {what}. Write an FP8 checkpoint with `wanfast quantize`"
                )
            mode = offload_fits[0]
            why = f"resident fits once FP8 but loading the bf16 checkpoint needs ~{_fmt(load_peak)}"
    return replace(settings, offload=mode), f"{head}: {what} -> {label[mode]} ({why})"


def _estimate_kw(settings: EngineSettings) -> dict:
    """``estimate_memory`` keywords for what ``settings`` put on the device."""
    te = settings.text_encoder_device
    te_on_device = te is None or torch.device(te) == torch.device(settings.device)
    return dict(dtype=settings.dtype, text_encoder_on_device=te_on_device, quant=settings.quant)


def check_request_fits(
    settings: EngineSettings, preset: ModelPreset, width: int, height: int, frames: int
) -> None:
    """For a process already running in ``settings.offload``'s mode under ``settings.memory_budget_gb``
    (the server's worker): raise ``MemoryBudgetError`` when one request of this size would not fit, naming
    the mode that would. No budget: nothing to check."""
    from wanfast.accel.offload import MemoryBudgetError, choose_mode

    if settings.memory_budget_gb is None:
        return
    budget = int(settings.memory_budget_gb * GiB)
    try:
        choose_mode(preset, (width, height), frames, budget, settings.offload, **_estimate_kw(settings))
    except MemoryBudgetError as e:
        raise MemoryBudgetError(
            f"{width}x{height} x {frames} frames does not fit this server's memory budget "
            f"({settings.memory_budget_gb:g} GiB): {e}"
        ) from None


def enforce_memory_budget(settings: EngineSettings) -> float | None:
    """On CUDA, cap this process's allocator at ``settings.memory_budget_gb`` of the device
    (``torch.cuda.set_per_process_memory_fraction``), so a run that would exceed it fails instead.
    Returns the fraction set, or None (no budget, or not CUDA)."""
    device = torch.device(settings.device)
    if settings.memory_budget_gb is None or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = min(1.0, settings.memory_budget_gb * GiB / total)
    if fraction == 1.0:
        log.warning("memory budget %g GiB >= the device's %s", settings.memory_budget_gb, _fmt(total))
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def _settings(device: str | torch.device, dtype, vae_dtype, text_encoder_device) -> EngineSettings:
    return EngineSettings(
        device=str(device),
        dtype=parse_dtype(dtype),
        vae_dtype=parse_dtype(vae_dtype) if vae_dtype is not None else None,
        text_encoder_device=str(text_encoder_device) if text_encoder_device is not None else None,
    )


def load_pipeline(
    ckpt_dir: str | os.PathLike,
    device: str | torch.device = "cuda",
    dtype: torch.dtype | str = torch.bfloat16,
    vae_dtype: torch.dtype | str | None = torch.float32,
    text_encoder_device: str | torch.device | None = None,
    settings: EngineSettings | None = None,
    plan_sizes: Sequence[tuple[int, int, int]] | None = None,
) -> WanPipeline:
    """Load a Wan2.2 T2V-A14B checkpoint folder (official or Diffusers layout, detected).

    ``dtype`` is the DiT and text-encoder weight dtype; the VAE runs in ``vae_dtype`` (float32 by
    default, as the official pipeline); ``text_encoder_device`` defaults to ``device``. ``settings``,
    when given, holds all of these (and the ``wanfast.accel`` switches) and replaces those four arguments.
    The experts are optimised by ``wanfast.accel.optimize_pipeline`` per the settings, then split over the
    ranks by ``wanfast.parallel.parallelize`` when ``settings.cfg_parallel`` or ``settings.ulysses > 1``.

    With ``settings.memory_budget_gb``, ``plan_memory`` picks the memory mode before any weight is read,
    for the largest of ``plan_sizes`` ((width, height, frames) of the requests to come; default: the
    model's default size and frames), logs the choice, and on CUDA the process is capped at the budget
    (``enforce_memory_budget``); the picked mode is ``pipe.settings.offload``.
    """
    settings = settings or _settings(device, dtype, vae_dtype, text_encoder_device)
    split = settings.cfg_parallel or settings.ulysses > 1  # multi-process: wanfast.parallel applies it
    if split:
        from wanfast.parallel import parallel_settings

        settings = parallel_settings(settings)
    layout = detect_layout(ckpt_dir)  # checks that every component is present before reading weights
    if settings.memory_budget_gb is not None:
        preset, fp8_ckpt = model_preset(layout)
        d = preset.defaults
        settings, why = plan_memory(settings, preset, plan_sizes or [(*d.size, d.frames)], fp8_ckpt)
        log.info("%s", why)
        enforce_memory_budget(settings)
    te_device = settings.text_encoder_device or settings.device
    # With an offload mode the experts load into CPU memory; apply_offload then puts on the device only
    # what that mode keeps there, so loading never needs both experts on the GPU at once.
    expert_device = "cpu" if settings.offload else settings.device
    high = load_transformer(layout.high_noise, expert_device, settings.dtype)
    low = load_transformer(layout.low_noise, expert_device, settings.dtype)
    if settings.lora_high_noise or settings.lora_low_noise:  # on the plain experts, before accel fuses q/k/v
        from wanfast.loading.lora import apply_lora, check_lora_settings

        check_lora_settings(settings)
        for dit, path in ((high, settings.lora_high_noise), (low, settings.lora_low_noise)):
            if path:
                apply_lora(dit, path, settings.lora_strength, settings.lora_merge)
    text_len = high.cfg.text_len
    text_encoder = load_text_encoder(
        layout.text_encoder, layout.tokenizer, te_device, settings.dtype, text_len
    )
    vae = load_vae(layout.vae, settings.device, settings.vae_dtype or settings.dtype)
    defaults = PRESETS["t2v-A14B"].defaults
    if layout.boundary is not None:
        defaults = replace(defaults, boundary=float(layout.boundary))
    pipe = optimize_pipeline(WanPipeline(text_encoder, high, low, vae, defaults, settings))
    if split:
        from wanfast.parallel import parallelize

        parallelize(pipe)
    if settings.offload:  # after accel: fusion / FP8 decide which weight tensors exist
        from wanfast.accel.offload import apply_offload

        apply_offload(pipe)
    return pipe


def tiny_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
    settings: EngineSettings | None = None,
    plan_sizes: Sequence[tuple[int, int, int]] | None = None,
) -> WanPipeline:
    """A small random-weight pipeline (the ``tiny`` preset), built by writing a tiny official-layout
    checkpoint and loading it through the same code as a real one. ``settings`` and ``plan_sizes`` as for
    ``load_pipeline``."""
    from wanfast.testing import write_official_checkpoint

    folder = workdir or tempfile.mkdtemp(prefix="wanfast-tiny-")
    write_official_checkpoint(folder, PRESETS["tiny"], seed=seed)
    pipe = load_pipeline(
        folder, device=device, dtype=dtype, vae_dtype=dtype, settings=settings, plan_sizes=plan_sizes
    )
    pipe.defaults = PRESETS["tiny"].defaults
    return pipe
