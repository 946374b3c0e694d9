"""LoRAs on the Wan2.2 DiT experts: merge a stack of files (each at its own strength) in float32, or keep
one separate and switchable. Reading every published key layout is ``lora_formats``.

Merging (the default) must happen on the plain loaded model, before ``wanfast.accel`` fuses q/k/v into one
GEMM or quantises to FP8. Each touched parameter is summed in float32 from the checkpoint's own values and
cast once (the official Lightning loader merges in fp32 and casts after; merging after a bf16 cast would put
~25% of merged elements one bf16 ulp off for an fp32 checkpoint): where the checkpoint stores a parameter
wider than the loaded model holds it, the merge re-reads that one tensor from the checkpoint
(``checkpoint_source``), so no second copy of the model is ever held.

The separate mode wraps each target in ``LoRALinear``, which the fusion, FP8 and compile passes do not
understand: ``check_lora_settings`` refuses those combinations up front.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanfast.config import ConfigError, EngineSettings, LoraSpec
from wanfast.loading.lora_formats import LoRAFile, _target, delta, read_lora

log = logging.getLogger("wanfast.lora")
# (official parameter name, the loaded tensor) -> the checkpoint's own value, or None: W holds it exactly
Source = Callable[[str, Tensor], "Tensor | None"]

__all__ = [
    "LoRAFile",
    "LoRALinear",
    "apply_lora",
    "apply_loras",
    "checkpoint_source",
    "check_lora_files",
    "check_lora_settings",
    "expert_strengths",
    "merge_lora_",
    "merge_loras_",
    "merged_value",
    "read_lora",
    "set_lora_enabled",
    "stack_order",
    "wrap_lora_",
]


@torch.no_grad()
def merge_loras_(
    dit: nn.Module, stack: Sequence[tuple[LoRAFile, float]], source: Source | None = None
) -> int:
    """``W += sum_i strength_i * update_i`` per parameter, summed in float32 and cast to W's dtype once,
    starting from the checkpoint's own value where ``source`` (``checkpoint_source``) has a wider one
    than W holds (so ``source`` is for a model fresh from that checkpoint: it restarts from the stored
    values). Strength-0 entries are skipped (bit-identical to no LoRA). In place; returns how many
    parameters changed."""
    order = stack_order(stack)
    for param, items in order.items():
        w = _target(dit, param, items[0][0].keys[param])
        stored = source(param, w) if source is not None else None
        # one parameter at a time: peak memory one float32 copy of the largest weight
        w.copy_(merged_value(w if stored is None else stored, param, items, w.dtype, w.device))
    return len(order)


def stack_order(stack: Sequence[tuple[LoRAFile, float]]) -> dict[str, list[tuple[LoRAFile, float]]]:
    """{official parameter: the (file, strength) entries that change it, in stack order}, strength-0 entries
    left out: the order ``merge_loras_`` sums in (float addition is not associative, so a switcher that
    must match it bit for bit sums in this same order)."""
    order: dict[str, list[tuple[LoRAFile, float]]] = {}
    for lora, s in stack:
        if s == 0:
            continue
        for param in lora.targets():
            order.setdefault(param, []).append((lora, s))
    return order


def merged_value(
    base: Tensor, param: str, items: Sequence[tuple[LoRAFile, float]], dtype: torch.dtype, device
) -> Tensor:
    """``(base + sum_i strength_i * update_i).to(dtype)``, summed in float32 on ``device`` in the order of
    ``items``: THE merge arithmetic, shared by ``merge_loras_`` and the server's switcher
    (``accel/lora_switch.py``), so both give the same bits. ``base``: the parameter's own value (any dtype,
    any device; the checkpoint's where it is wider than ``dtype``)."""
    acc = base.to(device, torch.float32)
    for lora, s in items:
        acc = acc + delta(lora, param, s, acc)
    return acc.to(dtype)


def merge_lora_(dit: nn.Module, lora: LoRAFile, strength: float = 1.0) -> int:
    """One file: ``merge_loras_(dit, [(lora, strength)])``."""
    return merge_loras_(dit, [(lora, strength)])


class LoRALinear(nn.Module):
    """A Linear plus a switchable low-rank update (the separate mode).

    ``weight`` is the effective weight (merged on the fly while ``enabled``), so code that reads
    ``layer.weight`` directly (the float32 time MLP and head, dtype queries) sees the LoRA too, and the
    result equals the merged model exactly. Costs one rank-r GEMM per access; merge to avoid it.
    """

    def __init__(self, base: nn.Linear, a: Tensor, b: Tensor, scale: float):
        super().__init__()
        self.base, self.scale, self.enabled = base, scale, True
        self.register_buffer("lora_A", a.to(base.weight.device, torch.float32))
        self.register_buffer("lora_B", b.to(base.weight.device, torch.float32))

    @property
    def weight(self) -> Tensor:
        w = self.base.weight
        if not self.enabled:
            return w
        return (w.float() + (self.lora_B @ self.lora_A) * self.scale).to(w.dtype)

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def _refuse_diffs(lora: LoRAFile) -> None:
    if lora.diffs:
        key = lora.keys[next(iter(lora.diffs))]
        raise ConfigError(
            f"{lora.path} holds full deltas ({key!r}...), which only merge: drop --lora-separate"
        )


def wrap_lora_(dit: nn.Module, lora: LoRAFile, strength: float = 1.0) -> int:
    """Replace each target Linear by a ``LoRALinear`` (enabled); returns how many were wrapped. Full
    deltas (``.diff*``) have no switchable form: such a file must be merged."""
    _refuse_diffs(lora)
    for name, (a, b, scale) in lora.pairs.items():
        if isinstance(dit.get_submodule(name), LoRALinear):
            raise ValueError(f"{name!r} already carries a separate LoRA; merge one of them instead")
        _target(dit, f"{name}.weight", lora.keys[f"{name}.weight"], linear=True)  # a plain Linear
        base = dit.get_submodule(name)
        parent, _, child = name.rpartition(".")
        dit.get_submodule(parent).register_module(child, LoRALinear(base, a, b, strength * scale))
    return len(lora.pairs)


def set_lora_enabled(module: nn.Module, enabled: bool) -> int:
    """Switch every separate LoRA inside ``module`` on or off; returns how many were switched."""
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = enabled
    return len(layers)


def apply_loras(
    dit: nn.Module,
    stack: Sequence[tuple[str | Path, float]],
    merge: bool = True,
    source: Source | None = None,
) -> nn.Module:
    """Read each (file, strength) of ``stack`` (checked against ``dit``) and merge them all into ``dit``
    (float32 sums from ``source``'s values where given, one cast), or wrap the one file separately."""
    loras = [(read_lora(path, dit), s) for path, s in stack if s != 0]
    if not merge:
        if len(loras) > 1:
            raise ConfigError("a separate (unmerged) LoRA is one file per expert: merge a stack")
        for lora, s in loras:
            log.info("lora: wrapped %d linears from %s (strength %g)", wrap_lora_(dit, lora, s), lora.path, s)
        return dit
    n = merge_loras_(dit, loras, source)
    log.info("lora: merged %d parameters from %s", n, ", ".join(f"{x.path} x{s:g}" for x, s in loras))
    return dit


def apply_lora(dit: nn.Module, path: str | Path, strength: float = 1.0, merge: bool = True) -> nn.Module:
    """One file: ``apply_loras(dit, [(path, strength)], merge)``."""
    return apply_loras(dit, [(path, strength)], merge)


def expert_strengths(stack: Sequence[LoraSpec], expert: str) -> list[tuple[str, float]]:
    """(file, strength) of each LoRA on ``expert`` ("high_noise", "low_noise", or "dit" for a one-DiT model,
    which takes the high-noise strength), strength-0 entries left out."""
    pick = (lambda x: x.strength_low_noise) if expert == "low_noise" else (lambda x: x.strength_high_noise)
    return [(x.path, pick(x)) for x in stack if pick(x) != 0]


def checkpoint_source(folder: str | Path) -> Source:
    """``source(param, w)``: the official parameter ``param`` as the DiT checkpoint ``folder`` stores it
    (CPU, its own dtype), or None where it is stored in ``w``'s dtype (``w`` then holds it exactly). Reads
    one tensor at a time (safetensors headers, memory-mapped), so the merge never holds a second model."""
    from safetensors import safe_open

    from wanfast.loading import dit_keys
    from wanfast.loading.checkpoint import safetensors_files
    from wanfast.loading.layout import DIT_WEIGHTS, dit_config

    diffusers = dit_config(folder)[1] == "diffusers"
    handles = [safe_open(str(f), "pt") for f in safetensors_files(folder, DIT_WEIGHTS)]
    where = {k: h for h in handles for k in h.keys()}
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}

    def dtype_of(param: str) -> torch.dtype | None:
        key = next(iter(dit_keys.official_to_diffusers({param: None}))) if diffusers else param
        return dtypes.get(where[key].get_slice(key).get_dtype())

    def source(param: str, w: Tensor) -> Tensor | None:
        key = next(iter(dit_keys.official_to_diffusers({param: None}))) if diffusers else param
        return None if dtype_of(param) == w.dtype else where[key].get_tensor(key)

    source.dtype_of = dtype_of  # the stored dtype from the header, no read (the LoRA switcher's plan)
    return source


def check_lora_files(stack: Sequence[LoraSpec], spec, merge: bool = True) -> None:
    """Each file of ``stack`` exists, parses, and fits the DiT of ``spec`` (a ``ModelSpec``; checked on a
    meta-device model: no weights, no memory), and, unmerged (``merge`` False), holds only low-rank pairs:
    a bad file fails before any checkpoint loads."""
    from wanfast.models.dit import WanDiT

    with torch.device("meta"):
        dit = WanDiT(spec.dit)
    for x in stack:
        if not Path(x.path).is_file():
            raise FileNotFoundError(f"LoRA file not found: {x.path}")
        lora = read_lora(x.path, dit)
        if not merge:
            _refuse_diffs(lora)


def check_lora_settings(settings: EngineSettings) -> None:
    """The separate (switchable) mode needs plain Linears through accel: refuse what would break it."""
    stack = settings.lora_stack()
    if settings.lora_merge or not stack:
        return
    for expert in ("high_noise", "low_noise"):
        if len(expert_strengths(stack, expert)) > 1:
            raise ConfigError(f"a separate (unmerged) LoRA is one file per expert; {expert} has several")
    compiled = settings.compile or (settings.compile is None and settings.device.startswith("cuda"))
    bad = [
        name
        for name, on in (
            ("fuse_projections", settings.fuse_projections),
            ("compile", compiled),
            ("cuda_graphs", settings.cuda_graphs),
            ("quant", settings.quant is not None),
        )
        if on
    ]
    if bad:
        raise ConfigError(
            f"a separate (unmerged) LoRA needs {', '.join(bad)} off: fusion/FP8 replace the wrapped Linears "
            "and compiled graphs bake the on/off switch in; merge the LoRA or turn these off"
        )
