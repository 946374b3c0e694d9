"""Memory modes: keep DiT weights in (pinned) CPU memory and bring them to the device only while needed.

- ``offload_experts``: both experts' weights live in CPU memory; the expert about to run is copied to the
  device before its first step and the other one's device copy is dropped, so one expert is resident
  (one swap at the high -> low boundary of a request, and one back at the start of the next request).
- ``offload_blocks``: the non-block weights (embeddings, time MLP/projection, head) stay resident; each
  block's weights live in CPU memory and a forward pre-hook brings them in. On CUDA the copies run on a
  side stream: block i+1 is prefetched while block i computes (an event orders the compute stream after
  the copy), and block i's device copy is dropped as soon as it returns, so at most two blocks are
  resident. On CPU the same bookkeeping runs with synchronous (no-op) copies, which is what the tests check.

Moving is done by pointing each ``Parameter``'s ``.data`` at either its host copy or a fresh device copy:
the Parameter objects (and so the module tree, the caches and the compiled block graphs, which take the
parameters as inputs) stay the same. Weights are read-only at inference, so "moving back" copies nothing:
the device copy is dropped. The host copies are pinned when CUDA is available (async, full-speed copies),
one flat buffer per expert (or block) registered once: ``accel/pinned.py`` says why not per tensor.
Apply after ``wanfast.accel.optimize_pipeline`` (fusion and FP8 change which tensors exist); CUDA graphs
bake weight addresses in, so they cannot be combined with offload.

``estimate_memory`` / ``choose_mode`` give a rough device-memory estimate per mode and pick the fastest
mode that fits (resident > expert > blocks); ``MemoryBudgetError`` names the modes that would fit.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn

from wanfast.accel.graphs import CUDAGraphDiT
from wanfast.accel.pinned import HostBuffer, check_host_room
from wanfast.config import ConfigError
from wanfast.specs import ModelSpec

MODES = ("expert", "blocks")
GiB = 1024**3


@dataclass
class Residency:
    """What is on the device, by key ("high_noise" for a whole expert, ("high_noise", 3) for a block):
    the current set, the peak count, load counts, and a bounded trace of ("load" | "free", key)."""

    resident: set = field(default_factory=set)
    peak: int = 0
    loads: int = 0
    trace: deque = field(default_factory=lambda: deque(maxlen=4096))

    def load(self, key) -> None:
        self.resident.add(key)
        self.loads += 1
        self.peak = max(self.peak, len(self.resident))
        self.trace.append(("load", key))

    def free(self, key) -> None:
        self.resident.discard(key)
        self.trace.append(("free", key))


def _tensors(module: nn.Module) -> list[Tensor]:
    """Parameters and buffers (FP8 scales are buffers), each once."""
    seen: dict[int, Tensor] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen.setdefault(id(t), t)
    return list(seen.values())


class HostCopy:
    """The tensors of one module with a CPU copy each; ``load`` points them at device copies, ``unload``
    back at the CPU copies (dropping the device ones). Starts unloaded."""

    def __init__(self, module: nn.Module, key, record: Residency, pin: bool) -> None:
        self.key, self.record = key, record
        self.tensors = _tensors(module)
        self.buffer = HostBuffer(self.tensors, pin)  # one flat buffer, pinned once (accel/pinned.py: why)
        self.host = self.buffer.adopt(self.tensors)
        self.nbytes = sum(h.numel() * h.element_size() for h in self.host)
        self.unload()

    @property
    def loaded(self) -> bool:
        return self.key in self.record.resident

    @torch.inference_mode()  # device copies are inference tensors whether loaded in a request or not
    def load(self, device: torch.device) -> None:
        for t, h in zip(self.tensors, self.host, strict=True):
            t.data = h.to(device, non_blocking=self.buffer.pinned)  # async from pinned memory
        self.record.load(self.key)

    def unload(self) -> None:
        for t, h in zip(self.tensors, self.host, strict=True):
            t.data = h
        self.record.free(self.key)


class BlockStreamer:
    """Streams the blocks of one DiT through the device (module docstring). Hooks are prepended so the
    weights are in place before any other pre-hook (the cross-K/V cache calls ``cross_attn.kv``)."""

    def __init__(self, dit: nn.Module, name: str, device: torch.device, record: Residency, pin: bool):
        self.device = device
        self.copies = [HostCopy(b, (name, i), record, pin) for i, b in enumerate(dit.blocks)]
        self.events: dict[int, torch.cuda.Event] = {}
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.handles = []
        for i, block in enumerate(dit.blocks):
            self.handles.append(block.register_forward_pre_hook(partial(self._before, i), prepend=True))
            self.handles.append(block.register_forward_hook(partial(self._after, i)))

    def _fetch(self, i: int) -> None:
        copy = self.copies[i]
        if self.stream is None:
            copy.load(self.device)
            return
        with torch.cuda.stream(self.stream):  # allocated and copied on the side stream
            copy.load(self.device)
            self.events[i] = torch.cuda.Event()
            self.events[i].record(self.stream)

    def _before(self, i: int, module: nn.Module, args) -> None:
        if not self.copies[i].loaded:  # first block of a forward after a release: nothing prefetched
            self._fetch(i)
        event = self.events.pop(i, None)
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)  # block i's kernels start after its copy
            for t in self.copies[i].tensors:
                t.data.record_stream(compute)  # the allocator reuses it only after block i's kernels
        nxt = (i + 1) % len(self.copies)  # the last block prefetches block 0 for the next forward
        if nxt != i and not self.copies[nxt].loaded:
            self._fetch(nxt)

    def _after(self, i: int, module: nn.Module, args, output) -> None:
        self.copies[i].unload()

    def release(self) -> None:
        """Drop every device copy (a prefetched block 0 when the other expert takes over)."""
        for i, copy in enumerate(self.copies):
            if copy.loaded:
                copy.unload()
                self.events.pop(i, None)


class OffloadedExpert(nn.Module):
    """An expert whose calls first tell the offload manager which expert runs; otherwise the DiT itself
    (``caches_of`` and ``reset_caches`` find its caches as a submodule's)."""

    def __init__(self, name: str, dit: nn.Module, before: Callable[[str], None]) -> None:
        super().__init__()
        self.name, self.dit, self.cfg = name, dit, getattr(dit, "cfg", None)
        self.__dict__["_before"] = before  # a plain callable, not a submodule

    def forward(self, *args, **kwargs) -> Tensor:
        self._before(self.name)
        return self.dit(*args, **kwargs)


class Offload:
    """The offload state of one pipeline: the mode, the residency record, per-expert host copies."""

    def __init__(self, pipe, mode: str, device: torch.device, pin: bool | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown offload mode {mode!r}; choose one of {', '.join(MODES)}")
        if any(isinstance(d, (CUDAGraphDiT, OffloadedExpert)) for d in pipe.experts.values()):
            raise ConfigError("offload needs plain or compiled experts, applied once, and no cuda_graphs")
        pin = torch.cuda.is_available() if pin is None else pin
        self.mode, self.device, self.record, self.active = mode, device, Residency(), None
        dits = dict(pipe.experts)
        # every expert ends in host memory; weights already on the CPU move tensor by tensor (no extra)
        off_host = sum(
            t.numel() * t.element_size() for d in dits.values() for t in _tensors(d) if t.device.type != "cpu"
        )
        check_host_room(off_host, f"--offload {mode}")
        if mode == "expert":
            self.experts = {n: HostCopy(d, n, self.record, pin) for n, d in dits.items()}
        else:
            self.streamers = {n: BlockStreamer(d, n, device, self.record, pin) for n, d in dits.items()}
            for dit in dits.values():  # embeddings, head, modulation: small, always resident
                for child_name, child in getattr(dit, "dit", dit).named_children():
                    if child_name != "blocks":
                        child.to(device)
        for name, dit in dits.items():
            pipe.experts[name] = OffloadedExpert(name, dit, self.activate)

    def activate(self, name: str) -> None:
        """Called before every forward of expert ``name``; does work only when the expert changes."""
        if name == self.active:
            return
        if self.mode == "expert":
            if self.active is not None:
                self.experts[self.active].unload()  # first, so at most one expert is resident
            self.experts[name].load(self.device)
        else:
            for other, streamer in self.streamers.items():
                if other != name:
                    streamer.release()
        self.active = name


def apply_offload(pipe, mode: str | None = None, pin: bool | None = None) -> Offload:
    """Apply ``mode`` (default ``pipe.settings.offload``) to an optimised ``WanPipeline`` in place; the
    ``Offload`` is kept as ``pipe.offload``. Expert mode makes the first expert (high-noise, or a one-DiT
    model's only one) resident right away: every request starts with it."""
    mode = mode or pipe.settings.offload
    if pipe.settings.cuda_graphs:
        raise ConfigError("--offload cannot be combined with CUDA graphs (they bake weight addresses in)")
    pipe.offload = Offload(pipe, mode, torch.device(pipe.device), pin)
    if mode == "expert":
        pipe.offload.activate(next(iter(pipe.experts)))
    return pipe.offload


# --- Memory estimate and mode choice -------------------------------------------------------------------

# Peak activation bytes per (token x model dim) inside one block, at batch 1 (the CFG passes run one after
# the other): float32 residual and modulated norm input (8), q, k, v, attention out in bf16 (8), the FFN
# hidden state (ffn_dim ~ 2.7 dim) and its GELU in bf16 (~11), plus allocator slack. A rough figure.
ACT_BYTES_PER_TOKEN_DIM = 32
# VAE decode peak per output pixel of a chunk of frames (96-384 channels of float32 feature maps at full
# and reduced resolution, a few alive at once, ~4 frames per chunk). Also rough.
VAE_BYTES_PER_PIXEL = 4 * 96 * 4 * 4


def _dits(pipe) -> list[nn.Module]:
    """The plain DiTs of a pipeline's experts (``OffloadedExpert`` and ``CUDAGraphDiT`` wrap ``dit``)."""
    dits = [getattr(d, "dit", d) for d in pipe.experts.values()]
    return [getattr(d, "dit", d) for d in dits]


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(module))


def _t5_params(cfg) -> int:
    """UMT5 encoder parameter count: embedding, per layer attention (q, k, v, o), gated FFN, two norms,
    and the per-layer relative position table; the final norm."""
    inner = cfg.num_heads * cfg.head_dim
    layer = 4 * cfg.dim * inner + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim + cfg.num_buckets * cfg.num_heads
    return cfg.vocab_size * cfg.dim + cfg.num_layers * layer + cfg.dim


@dataclass(frozen=True)
class WeightSizes:
    """Device bytes per part: a whole expert (max of the two), its non-block part, its largest block."""

    expert: int
    non_block: int
    block: int
    num_experts: int
    vae: int
    text_encoder: int  # 0 when the text encoder runs on the CPU


@functools.lru_cache(maxsize=8)
def _preset_modules(
    preset: ModelSpec, dtype: torch.dtype, quant: str | None = None
) -> tuple[nn.Module, nn.Module]:
    """A DiT (in ``dtype``; its block linears FP8 as ``accel.fp8`` makes them when ``quant == "fp8"``)
    and a VAE (float32) on the meta device: shapes only, built once per (preset, dtype, quant)."""
    from wanfast.models import vae_class
    from wanfast.models.dit import WanDiT

    with torch.device("meta"):
        dit, vae = WanDiT(preset.dit).to(dtype), vae_class(preset.vae)(preset.vae)
    if quant is not None:
        from wanfast.accel.fp8 import apply_quant

        apply_quant(dit, quant)  # meta tensors: the FP8 weights and scales, no data
    return dit, vae


def weight_sizes(
    source,
    dtype: torch.dtype = torch.bfloat16,
    text_encoder_on_device: bool = True,
    quant: str | None = None,
):
    """From a built ``WanPipeline``'s parameters (offloaded or not; FP8 already counted as built), or from
    a ``ModelSpec`` (modules built on the meta device; DiT and T5 in ``dtype``, the VAE in float32, the
    DiT's block linears FP8 with ``quant="fp8"``, about half the bf16 expert)."""
    if isinstance(source, ModelSpec):
        dit, vae = _preset_modules(source, dtype, quant)
        dits, n = [dit], source.num_experts
        vae_b, te_b = _nbytes(vae), _t5_params(source.text_encoder) * dtype.itemsize
    else:
        dits = _dits(source)
        n, vae_b = len(dits), _nbytes(source.vae)
        te_model = getattr(source.text_encoder, "model", None)
        te_b = _nbytes(te_model) if isinstance(te_model, nn.Module) else 0
        te_dev = source.settings.text_encoder_device
        text_encoder_on_device = te_dev is None or torch.device(te_dev) == torch.device(source.device)
    expert = max(_nbytes(d) for d in dits)
    block = max(_nbytes(b) for d in dits for b in d.blocks)
    non_block = max(_nbytes(d) - sum(_nbytes(b) for b in d.blocks) for d in dits)
    return WeightSizes(expert, non_block, block, n, vae_b, te_b if text_encoder_on_device else 0)


def activation_bytes(source, size: tuple[int, int], frames: int) -> int:
    """Peak activation estimate: the larger of one DiT block's working set (tokens x dim x
    ``ACT_BYTES_PER_TOKEN_DIM``) plus the cross-K/V cache, and the VAE decode (``VAE_BYTES_PER_PIXEL``)."""
    cfg = source.dit if isinstance(source, ModelSpec) else _dits(source)[0].cfg
    width, height = size
    pt, ph, pw = cfg.patch_size
    tokens = math.ceil(((frames - 1) // 4 + 1) / pt) * (height // 8 // ph) * (width // 8 // pw)
    kv_cache = 2 * cfg.num_layers * 2 * cfg.text_len * cfg.dim * 2  # 2 prompts x (k, v), bf16, one expert
    dit = tokens * cfg.dim * ACT_BYTES_PER_TOKEN_DIM + kv_cache
    return max(dit, width * height * VAE_BYTES_PER_PIXEL)


def estimate_memory(source, size: tuple[int, int], frames: int, offload: str | None = None, **kw) -> int:
    """Estimated peak device bytes of a request of ``size`` (width, height) x ``frames`` in mode
    ``offload`` (None: resident). An estimate (weights exact, activations rough), not a guarantee.
    ``kw`` go to ``weight_sizes`` (``dtype``, ``text_encoder_on_device``, ``quant``)."""
    w = weight_sizes(source, **kw)
    if offload is None:
        dit = w.num_experts * w.expert
    elif offload == "expert":
        dit = w.expert
    elif offload == "blocks":
        dit = w.num_experts * w.non_block + 2 * w.block  # the running block and the prefetched one
    else:
        raise ConfigError(f"unknown offload mode {offload!r}; choose one of {', '.join(MODES)}")
    return dit + w.vae + w.text_encoder + activation_bytes(source, size, frames)


class MemoryBudgetError(ConfigError):
    """The requested mode does not fit the device's free memory; the message names the modes that do."""


def _label(mode: str | None) -> str:
    return "resident" if mode is None else f"--offload {mode}"


def choose_mode(
    source, size: tuple[int, int], frames: int, free_bytes: int, requested: str | None = "auto", **kw
) -> str | None:
    """With ``requested="auto"``, the fastest mode that fits ``free_bytes`` (None = resident, then
    "expert", then "blocks"); with a mode (None = resident), that mode if it fits. Raises
    ``MemoryBudgetError`` otherwise, naming the fastest mode that would fit."""
    need = {m: estimate_memory(source, size, frames, m, **kw) for m in (None, *MODES)}
    fits = [m for m in need if need[m] <= free_bytes]
    if requested == "auto" and fits:
        return fits[0]
    if requested != "auto" and requested in fits:
        return requested
    gib = {m: f"{need[m] / GiB:.1f}" for m in need}
    text = (
        f"needs ~{gib[None]} GiB resident; --offload expert needs ~{gib['expert']} GiB, "
        f"--offload blocks ~{gib['blocks']} GiB; this GPU has {free_bytes / GiB:.1f} GiB free"
    )
    if fits:
        hint = f"use {_label(fits[0])}"
    else:
        hint = "no mode fits: use a smaller size or fewer frames, --quant fp8, or a larger GPU"
    asked = "this request" if requested == "auto" else _label(requested)
    raise MemoryBudgetError(f"{asked} does not fit: {text}. {hint}")
