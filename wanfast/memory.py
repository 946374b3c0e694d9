"""The memory plan: which memory mode (resident, expert offload, block offload) fits a budget, checked
before any weight is read (``plan_memory``), per request (``check_request_fits``), and enforced on CUDA
(``enforce_memory_budget``). Estimates come from ``accel.offload.estimate_memory`` on the model's spec."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import torch

from wanfast.config import ConfigError, EngineSettings
from wanfast.specs import ModelSpec

log = logging.getLogger("wanfast.memory")
GiB = 1024**3


def _fmt(nbytes: int) -> str:
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB / 10 else f"{nbytes / 2**20:.1f} MiB"


def plan_memory(
    settings: EngineSettings,
    spec: ModelSpec,
    sizes: Sequence[tuple[int, int, int]],
    fp8_checkpoint: bool = False,
) -> tuple[EngineSettings, str | None]:
    """With ``settings.memory_budget_gb``: the settings with ``offload`` set to the fastest memory mode
    (resident, then expert, then blocks) whose estimate (``accel.offload.estimate_memory``: DiT weights in
    ``settings.dtype``, FP8 with ``quant``, the text encoder only when it runs on the device) fits the
    budget for the largest of ``sizes`` ((width, height, frames) each), and the reason, for a log line.
    An explicit ``settings.offload`` is kept if it fits. Raises ``MemoryBudgetError`` naming what fits.
    Without a budget: ``(settings, None)``."""
    from wanfast.accel.offload import MODES, MemoryBudgetError, choose_mode, estimate_memory

    if settings.memory_budget_gb is None:
        return settings, None
    if not settings.memory_budget_gb > 0:
        raise ConfigError(f"the memory budget must be > 0 GiB, got {settings.memory_budget_gb!r}")
    budget = int(settings.memory_budget_gb * GiB)
    kw = _estimate_kw(settings)
    te, te_on_device = settings.text_encoder_device, kw["text_encoder_on_device"]
    w, h, frames = _largest(spec, sizes)
    need = {m: estimate_memory(spec, (w, h), frames, m, **kw) for m in (None, *MODES)}
    label = {None: "resident", "expert": "--offload expert", "blocks": "--offload blocks"}
    what = ", ".join(f"{label[m]} ~{_fmt(need[m])}" for m in need)
    where = "text encoder on " + ("the device" if te_on_device else str(te))
    head = f"memory budget {settings.memory_budget_gb:g} GiB, {w}x{h} x {frames} frames, {where}"
    head += f", {settings.quant}" if settings.quant else ""
    fits = [m for m in need if need[m] <= budget]
    try:
        mode = choose_mode(spec, (w, h), frames, budget, settings.offload or "auto", **kw)
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
        load_peak = estimate_memory(spec, (w, h), frames, None, **{**kw, "quant": None})
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


def overlap_load_peak(
    settings: EngineSettings, spec: ModelSpec, sizes: Sequence[tuple[int, int, int]], fp8_checkpoint: bool
) -> tuple[int, int] | None:
    """When the low-noise expert loads during the first steps (``builder.overlap_rule``) while accel
    quantises a bf16 checkpoint, that expert's bf16 weights sit beside the first steps' activations: (the
    estimated peak, the bytes it must fit: the budget, else the CUDA device's memory). None where overlapping
    adds nothing to the resident estimate (FP8 or bf16 weights loaded as they run), or on the CPU without a
    budget."""
    from wanfast.accel.offload import estimate_memory, weight_sizes

    device = torch.device(settings.device)
    if not settings.quant or fp8_checkpoint or (settings.memory_budget_gb is None and device.type != "cuda"):
        return None
    kw = _estimate_kw(settings)
    w, h, frames = _largest(spec, sizes)
    peak = (
        estimate_memory(spec, (w, h), frames, None, **kw) + weight_sizes(spec, **{**kw, "quant": None}).expert
    )
    if settings.memory_budget_gb is not None:
        return peak, int(settings.memory_budget_gb * GiB)
    return peak, _cuda_memory(device)[1]


def _largest(spec: ModelSpec, sizes: Sequence[tuple[int, int, int]]) -> tuple[int, int, int]:
    """The (width, height, frames) of ``sizes`` with the most activation memory."""
    from wanfast.accel.offload import activation_bytes

    return max(sizes, key=lambda s: activation_bytes(spec, (s[0], s[1]), s[2]))


def _cuda_memory(device: torch.device) -> tuple[int, int]:
    """(index, total bytes) of a CUDA device; a bare "cuda" is this thread's current one."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.get_device_properties(index).total_memory


def _estimate_kw(settings: EngineSettings) -> dict:
    """``estimate_memory`` keywords for what ``settings`` put on the device."""
    te = settings.text_encoder_device
    te_on_device = te is None or torch.device(te) == torch.device(settings.device)
    return dict(dtype=settings.dtype, text_encoder_on_device=te_on_device, quant=settings.quant)


def check_request_fits(
    settings: EngineSettings, spec: ModelSpec, width: int, height: int, frames: int
) -> None:
    """For a process already running in ``settings.offload``'s mode under ``settings.memory_budget_gb``
    (the server's worker): raise ``MemoryBudgetError`` when one request of this size would not fit, naming
    the mode that would. No budget: nothing to check."""
    from wanfast.accel.offload import MemoryBudgetError, choose_mode

    if settings.memory_budget_gb is None:
        return
    budget = int(settings.memory_budget_gb * GiB)
    try:
        choose_mode(spec, (width, height), frames, budget, settings.offload, **_estimate_kw(settings))
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
    index, total = _cuda_memory(device)
    fraction = min(1.0, settings.memory_budget_gb * GiB / total)
    if fraction == 1.0:
        log.warning("memory budget %g GiB >= the device's %s", settings.memory_budget_gb, _fmt(total))
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction
