"""Switching the LoRA set of a built (optimised, possibly compiled / graphed / offloaded) pipeline in place,
without reloading the checkpoint: what a server worker does between jobs that name different LoRAs.

Exactness: a switched model must hold the same bits as a fresh build with that set. The builder merges on
the plain loaded model, in float32 from the checkpoint's own value, one cast (``loading.lora.merge_loras_``),
before ``accel`` fuses q/k/v. So the switcher keeps an exact copy of the BASE (pre-LoRA) value of every
parameter any library file touches, in the dtype the fresh merge starts from (the checkpoint's, where
``source`` says it is wider than the model's; else the loaded value), and a switch writes, for each
parameter the old or the new set touches, ``merged_value(base, items)`` (the one merge function, the same
stack order, on the device the fresh build merges on) into the live tensor: the parameter itself, or its
rows of a fused ``wqkv`` [3C, C] / ``wkv`` [2C, C] (``accel/fuse.py`` concatenates q, k, v in that order).
Writes are ``copy_`` into the same storage, so compiled blocks and CUDA graphs (which hold the Parameter
objects / their addresses) stay valid. A parameter no set touches any more gets its base back (a bf16 base
cast to bf16 is the same bits; the cast of a wider base is what the plain load wrote).

Where the base copies live (``placement="auto"``): with the model in device memory, on that device when the
copies fit in its free memory while leaving ``reserve`` bytes (the worker passes the memory plan's
activation estimate of the largest request plus 10% of the device); otherwise in one pinned host buffer
(``accel/pinned.py``), copied in per parameter at switch time. With an offload mode the masters are the
host copies and the fresh build merges on the CPU, so the bases stay on the CPU and the merge runs there
(slow at A14B size: tens of seconds; a resident model is the fast path).

FP8 (``--quant fp8``): the builder merges before quantising, so for an FP8 layer the base is always the
checkpoint's value (read through ``source``), and a switch merges it to the compute dtype and quantises it
with ``accel.fp8``'s own ``quantize_rows`` into the layer's ``qweight`` / ``scale`` rows (per output row:
the rows of q in a fused qkv quantise as q alone). Without a checkpoint (an FP8 checkpoint, random
weights) there is no such base: refused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wanfast.accel.fp8 import FP8Linear
from wanfast.config import ConfigError
from wanfast.kernels.rowquant import quantize_rows
from wanfast.loading.lora import LoRAFile, Source, merged_value, stack_order
from wanfast.loading.lora_formats import _target
from wanfast.models.dit import WanDiT

log = logging.getLogger("wanfast.lora_switch")

# (attention, official Linear) -> (fused Linear that holds its rows, index of its row block, blocks in all)
_FUSED = {
    ("self_attn", "q"): ("wqkv", 0, 3),
    ("self_attn", "k"): ("wqkv", 1, 3),
    ("self_attn", "v"): ("wqkv", 2, 3),
    ("cross_attn", "k"): ("wkv", 0, 2),
    ("cross_attn", "v"): ("wkv", 1, 2),
}
_NEVER = torch.empty(0, dtype=torch.float8_e4m3fn)  # a dtype no checkpoint_source tensor has: always read
# one entry of a LoRA set: (file, high-noise strength, low-noise strength)
Entry = tuple[LoRAFile, float, float]


def plain_dit(module: nn.Module) -> WanDiT:
    """The ``WanDiT`` inside an expert as the pipeline calls it (``OffloadedExpert`` / ``CUDAGraphDiT``
    keep it as ``.dit``)."""
    while not isinstance(module, WanDiT):
        module = module.dit
    return module


def locate(dit: WanDiT, param: str) -> tuple[nn.Module, str, slice]:
    """Where the official parameter ``param`` lives in ``dit`` as built: (module, attribute, rows), the
    rows those of its Linear in a fused ``wqkv`` / ``wkv`` (after ``fuse_projections``), else all."""
    parts = param.split(".")
    if len(parts) == 5 and parts[0] == "blocks" and (parts[2], parts[3]) in _FUSED:
        attn = getattr(dit.blocks[int(parts[1])], parts[2])
        fused, j, n = _FUSED[(parts[2], parts[3])]
        if hasattr(attn, fused):
            module = getattr(attn, fused)
            rows = module.out_features // n
            return module, parts[4], slice(j * rows, (j + 1) * rows)
    module_name, _, attr = param.rpartition(".")
    _target(dit, param, param)  # a clear error for a parameter this model lacks
    return dit.get_submodule(module_name), attr, slice(None)


def _is_fp8_weight(module: nn.Module, attr: str) -> bool:
    return isinstance(module, FP8Linear) and attr == "weight"


def live_tensor(dit: WanDiT, param: str) -> Tensor:
    """The tensor holding ``param`` in ``dit`` as built: the parameter, its rows of a fused weight / bias,
    or, for an FP8 layer's weight, its rows of ``qweight``."""
    module, attr, rows = locate(dit, param)
    return (module.qweight if _is_fp8_weight(module, attr) else getattr(module, attr))[rows]


def expert_stack(stack: Sequence[Entry], expert: str) -> list[tuple[LoRAFile, float]]:
    """The (file, strength) list of ``expert``, as ``loading.lora.expert_strengths`` picks it (a one-DiT
    model, "dit", takes the high-noise strength)."""
    return [(f, lo if expert == "low_noise" else hi) for f, hi, lo in stack]


@dataclass
class _Expert:
    dit: WanDiT
    device: torch.device  # where the fresh build merges, and where the masters live
    bases: dict[str, Tensor]  # official parameter -> its base value (on ``device`` or pinned host)
    current: dict[str, list[tuple[LoRAFile, float]]]  # what each parameter holds now (stack_order)


class LoraSwitcher:
    """Keeps the bases of every parameter ``files`` touch and rewrites them per LoRA set (module
    docstring). ``sources``: per expert, ``loading.lora.checkpoint_source`` of its checkpoint (None: the
    loaded values are the checkpoint's, e.g. random weights or a same-dtype checkpoint)."""

    def __init__(
        self,
        pipe,
        files: Iterable[LoRAFile],
        sources: dict[str, Source | None] | None = None,
        placement: str = "auto",
        reserve: int = 0,
    ) -> None:
        if placement not in ("auto", "device", "host"):
            raise ValueError(f"placement {placement!r}: auto, device or host")
        settings = getattr(pipe, "settings", None)
        if settings is not None and settings.lora_stack():  # its weights would be taken as the bases
            raise ConfigError(
                "LoRA switching needs a model built without LoRAs (--lora): put them in the set"
            )
        self.pipe, self.offload = pipe, getattr(pipe, "offload", None)
        files = list(files)
        targets = sorted({p for f in files for p in f.targets()})
        self.experts: dict[str, _Expert] = {}
        self._sources = sources or {}
        metas: dict[str, dict[str, Tensor]] = {}  # shape and dtype of each base, no values held
        for name, module in pipe.experts.items():
            dit = plain_dit(module)
            device = torch.device("cpu") if self.offload is not None else next(dit.parameters()).device
            self.experts[name] = _Expert(dit, device, {}, {})
            metas[name] = {}
            for param in targets:
                metas[name][param] = self._base_meta(name, param)
        self.placement = self._place(placement, reserve, metas)
        self.stack: tuple[Entry, ...] = ()
        # the files' tensors on the GPU that merges (their own dtype: the float32 cast happens in ``delta``
        # as in the builder's merge, exact either side of the copy; ~1% of the bases at rank 64): no
        # pageable host copy per switch
        self._staged: dict[tuple[int, torch.device], LoRAFile] = {}
        for f in files:
            for dev in {e.device for e in self.experts.values() if e.device.type == "cuda"}:
                self._staged[(id(f), dev)] = _to_device(f, dev)

    def _base_value(self, expert: str, param: str) -> Tensor:
        """The value the fresh build's merge starts from: the checkpoint's where ``source`` has a wider one
        (read now: one tensor at a time, never a second model in memory), else the loaded weight."""
        module, attr, rows = locate(self.experts[expert].dit, param)
        source = self._sources.get(expert)
        if _is_fp8_weight(module, attr):  # the build merged before quantising: only the checkpoint has it
            if source is None:
                raise ConfigError(
                    f"{param} is an FP8 layer: switching LoRAs re-quantises from the checkpoint's values, and "
                    "this model has no checkpoint (an FP8 checkpoint, or random weights); serve the bf16 "
                    "checkpoint with --quant fp8"
                )
            return source(param, _NEVER)
        live = getattr(module, attr)[rows]
        stored = source(param, live) if source is not None else None
        return (live if stored is None else stored).detach()

    def _base_meta(self, expert: str, param: str) -> Tensor:
        """``_base_value``'s shape and dtype on the meta device, from the checkpoint's header where the
        source tells its dtype (``checkpoint_source`` does): the values are read once, into their place."""
        source = self._sources.get(expert)
        dtype_of = getattr(source, "dtype_of", None)
        if dtype_of is None:
            v = self._base_value(expert, param)
            return torch.empty(v.shape, dtype=v.dtype, device="meta")
        module, attr, rows = locate(self.experts[expert].dit, param)
        live = (module.qweight if _is_fp8_weight(module, attr) else getattr(module, attr))[rows]
        stored = dtype_of(param)
        dtype = stored if _is_fp8_weight(module, attr) or stored != live.dtype else live.dtype
        return torch.empty(live.shape, dtype=dtype, device="meta")

    def _place(self, placement: str, reserve: int, metas: dict[str, dict[str, Tensor]]) -> str:
        """Copy the bases to the compute device or into one pinned host buffer per expert (module
        docstring's rule); returns where they went."""
        nbytes = sum(t.numel() * t.element_size() for m in metas.values() for t in m.values())
        cuda = [e.device for e in self.experts.values() if e.device.type == "cuda"]
        if not cuda:
            placement = "device"  # the CPU
        elif placement == "auto":
            free = min(torch.cuda.mem_get_info(d)[0] for d in cuda)
            placement = "device" if nbytes + reserve <= free else "host"
        for name, e in self.experts.items():
            if placement == "device":
                for param, m in metas[name].items():
                    e.bases[param] = torch.empty(m.shape, dtype=m.dtype, device=e.device)
            else:
                from wanfast.accel.pinned import HostBuffer

                e.host = HostBuffer(list(metas[name].values()), pin=True)  # kept: it owns the pinned memory
                e.bases = dict(zip(metas[name], e.host.views, strict=True))
            for param, base in e.bases.items():
                base.copy_(self._base_value(name, param))
        log.info("lora switch: %.2f GB of base weights in %s memory", nbytes / 1e9, placement)
        return placement

    @torch.inference_mode()
    def switch(self, stack: Sequence[Entry]) -> int:
        """Make the model hold ``stack`` merged (as a fresh build with it would); returns how many
        parameters were rewritten. On an error the model is left in an unknown state: call again (a
        failed switch forgets what the parameters hold, so the next one rewrites every one)."""
        for f, _, _ in stack:
            missing = [p for p in f.targets() if p not in next(iter(self.experts.values())).bases]
            if missing:
                raise ValueError(f"{f.path} touches {missing[0]!r}, which the switcher keeps no base of")
        if self.offload is not None:  # the masters are the host copies: drop the device copies first
            self._release_offload()
        n = 0
        for name, e in self.experts.items():
            want = stack_order(expert_stack(stack, name))
            try:
                for param in sorted(set(want) | set(e.current)):
                    items = want.get(param, [])
                    if param in e.current and _same(e.current[param], items):
                        continue
                    module, attr, rows = locate(e.dit, param)
                    fp8 = _is_fp8_weight(module, attr)
                    dtype = module.compute_dtype if fp8 else getattr(module, attr).dtype
                    base = e.bases[param].to(e.device, non_blocking=True)  # from pinned memory: async
                    if items:
                        items = [(self._staged.get((id(f), e.device), f), x) for f, x in items]
                        value = merged_value(base, param, items, dtype, e.device)
                    else:  # the plain load's value: the base cast once, as load_transformer did
                        value = base.to(dtype)
                    if fp8:  # quantised per output row as accel.fp8 did: the fused layer's rows are these
                        qweight, scale = quantize_rows(value)
                        module.qweight[rows].copy_(qweight)
                        module.scale[rows].copy_(scale[:, 0])
                    else:
                        getattr(module, attr)[rows].copy_(value)
                    n += 1
            except BaseException:
                e.current = {p: [(None, float("nan"))] for p in e.bases}  # unknown: rewrite all next time
                raise
            e.current = want
        if self.offload is not None and self.offload.mode == "expert":
            self.offload.activate(next(iter(self.pipe.experts)))  # as apply_offload leaves it
        self.stack = tuple(stack)
        return n

    def _release_offload(self) -> None:
        off = self.offload
        if off.mode == "expert":
            for copy in off.experts.values():
                if copy.loaded:
                    copy.unload()
        else:
            for streamer in off.streamers.values():
                streamer.release()
        off.active = None


def _to_device(f: LoRAFile, device: torch.device) -> LoRAFile:
    pairs = {n: (a.to(device), b.to(device), scale) for n, (a, b, scale) in f.pairs.items()}
    return LoRAFile(f.path, pairs, {p: d.to(device) for p, d in f.diffs.items()}, f.keys)


def _same(a: list[tuple[LoRAFile, float]], b: list[tuple[LoRAFile, float]]) -> bool:
    return len(a) == len(b) and all(x is y and s == t for (x, s), (y, t) in zip(a, b, strict=True))


def enable_lora_switching(
    pipe, files: Iterable[LoRAFile], sources=None, placement: str = "auto", reserve: int = 0
) -> LoraSwitcher:
    """Attach a ``LoraSwitcher`` for ``files`` to ``pipe`` (as ``pipe.lora_switcher``); the model must hold
    no LoRA yet (its current weights are taken as the bases)."""
    pipe.lora_switcher = LoraSwitcher(pipe, files, sources, placement, reserve)
    return pipe.lora_switcher


def switch_loras(pipe, stack: Sequence[Entry]) -> float:
    """Switch ``pipe`` (``enable_lora_switching`` done) to ``stack``; returns the seconds it took, device
    work included (synchronised on CUDA)."""
    t0 = time.perf_counter()
    pipe.lora_switcher.switch(stack)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return time.perf_counter() - t0
