"""LoRA files for the Wan2.2 DiT experts: read (three key styles), merge, or keep separate and switchable.

Key styles accepted (detected per key, so a file may mix them):

- Diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``.lora_B.weight`` (Diffusers
  module names, mapped to ours by the ``dit_keys`` table);
- official-key style (ComfyUI, lightx2v): ``diffusion_model.blocks.0.self_attn.q.lora_A.weight``;
- Kohya / ComfyUI: ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` + ``.lora_up.weight`` + ``.alpha``
  (underscored official or Diffusers module names).

A pair is down ``A`` [r, in] and up ``B`` [out, r]; the update is ``W += strength * (B @ A) * alpha / r``,
with ``alpha = r`` (scale 1) when the file has none, as PEFT saves it.

Merging (the default) must happen on the plain loaded model, before ``wanfast.accel`` fuses q/k/v into one
GEMM. The separate mode wraps each target in ``LoRALinear``, which the fusion, FP8 and compile passes do not
understand: ``check_lora_settings`` refuses those combinations up front.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanfast.config import ConfigError, EngineSettings
from wanfast.loading.checkpoint import CheckpointError, require_file
from wanfast.loading.dit_keys import _DIFFUSERS  # the one official <-> Diffusers table, not a copy

log = logging.getLogger("wanfast.lora")

# The DiT Linears a LoRA may target (official names; "*" is a block index). patch_embedding is a Conv3d.
_BLOCK_LINEARS = tuple(
    f"blocks.*.{n}"
    for n in (
        "self_attn.q",
        "self_attn.k",
        "self_attn.v",
        "self_attn.o",
        "cross_attn.q",
        "cross_attn.k",
        "cross_attn.v",
        "cross_attn.o",
        "ffn.0",
        "ffn.2",
    )
)
_TOP_LINEARS = (
    "text_embedding.0",
    "text_embedding.2",
    "time_embedding.0",
    "time_embedding.2",
    "time_projection.1",
    "head.head",
)
_OFFICIAL = frozenset(_BLOCK_LINEARS + _TOP_LINEARS)
_FROM_DIFFUSERS = {d: o for o, d in _DIFFUSERS if o in _OFFICIAL}
# Kohya flattens dots to underscores; both naming schemes occur in the wild, so both are accepted.
_FROM_KOHYA = {o.replace(".", "_"): o for o in _OFFICIAL} | {
    d.replace(".", "_"): o for d, o in _FROM_DIFFUSERS.items()
}
# Wrapper prefixes seen in published files; stripped before the module name is looked up.
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")
_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_down.weight": "A",
    ".lora_up.weight": "B",
    ".alpha": "alpha",
}

LoRA = dict[str, tuple[Tensor, Tensor, float | None]]


def _official_module(module: str) -> str | None:
    """A LoRA module name (any accepted style, prefix already stripped) -> official name, or None."""
    dotted = re.match(r"^blocks\.(\d+)\.(.+)$", module)
    under = re.match(r"^blocks_(\d+)_(.+)$", module)
    if dotted:
        idx, generic = dotted.group(1), f"blocks.*.{dotted.group(2)}"
    elif under:
        idx, generic = under.group(1), f"blocks_*_{under.group(2)}"
    else:
        idx, generic = None, module
    name = generic if generic in _OFFICIAL else _FROM_DIFFUSERS.get(generic) or _FROM_KOHYA.get(generic)
    if name is None:
        return None
    return name.replace("*", idx) if idx is not None else name


def _split_key(key: str) -> tuple[str, str]:
    """``key`` -> (official module name, role "A" | "B" | "alpha"); CheckpointError naming the key."""
    role = next((r for s, r in _SUFFIXES.items() if key.endswith(s)), None)
    module = key[: key.rfind(".lora_") if role != "alpha" else -len(".alpha")] if role else key
    for prefix in _PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix) :]
            break
    name = _official_module(module) if role else None
    if name is None:
        raise CheckpointError(
            f"unknown LoRA key {key!r}: not a lora_A/lora_B/lora_down/lora_up/alpha entry of a Wan2.2 "
            "T2V DiT Linear (a LoRA for another architecture?)"
        )
    return name, role


def _target(dit: nn.Module, name: str, key: str) -> nn.Linear:
    """The plain Linear named ``name`` in ``dit`` (inside a LoRALinear if already wrapped)."""
    try:
        module = dit.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"LoRA key {key!r} targets {name!r}, which this model lacks") from None
    module = module.base if isinstance(module, LoRALinear) else module
    if not isinstance(module, nn.Linear):
        raise CheckpointError(f"LoRA key {key!r} targets {name!r}, a {type(module).__name__}, not a Linear")
    return module


def read_lora(path: str | Path, dit: nn.Module | None = None) -> LoRA:
    """Read a LoRA ``.safetensors`` file -> {official module name: (A [r, in], B [out, r], alpha or None)}.

    With ``dit``, every pair is checked against the model's Linear shapes; errors name the file's key.
    """
    from safetensors.torch import load_file

    raw = load_file(str(require_file(path, "LoRA file")))
    parts: dict[str, dict[str, Tensor]] = {}
    keys: dict[str, str] = {}  # module -> a file key, for error messages
    for key, tensor in raw.items():
        name, role = _split_key(key)
        if role in parts.setdefault(name, {}):
            raise CheckpointError(f"LoRA key {key!r}: a second {role} for module {name!r}")
        parts[name][role] = tensor
        if role == "A" or name not in keys:  # name the down matrix's key, whatever the file's order
            keys[name] = key
    if not parts:
        raise CheckpointError(f"LoRA file {path} holds no tensors")
    lora: LoRA = {}
    for name, p in parts.items():
        key = keys[name]
        if "A" not in p or "B" not in p:
            raise CheckpointError(
                f"LoRA key {key!r}: module {name!r} lacks its {'B' if 'A' in p else 'A'} (up/down) matrix"
            )
        a, b = p["A"], p["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"LoRA key {key!r}: down {tuple(a.shape)} and up {tuple(b.shape)} are not a rank-r pair"
            )
        alpha = float(p["alpha"].item()) if "alpha" in p else None
        if dit is not None:
            w = _target(dit, name, key).weight
            if (b.shape[0], a.shape[1]) != tuple(w.shape):
                raise CheckpointError(
                    f"LoRA key {key!r}: update {b.shape[0]}x{a.shape[1]} does not fit {name!r} "
                    f"weight {tuple(w.shape)} (a LoRA for another model size?)"
                )
        lora[name] = (a, b, alpha)
    return lora


def _scale(a: Tensor, alpha: float | None) -> float:
    return 1.0 if alpha is None else alpha / a.shape[0]


def _delta(a: Tensor, b: Tensor, scale: float, like: Tensor) -> Tensor:
    """(B @ A) * scale in float32 on ``like``'s device: low-precision A/B products lose the small update."""
    dev = like.device
    return (b.to(dev, torch.float32) @ a.to(dev, torch.float32)) * scale


@torch.no_grad()
def merge_lora_(dit: nn.Module, lora: LoRA, strength: float = 1.0) -> int:
    """``W += strength * (B @ A) * alpha / r`` for every pair, in float32, cast back to W's dtype.
    In place; returns the number of Linears changed."""
    for name, (a, b, alpha) in lora.items():
        w = _target(dit, name, name).weight
        w.copy_((w.float() + _delta(a, b, strength * _scale(a, alpha), w)).to(w.dtype))
    return len(lora)


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


def wrap_lora_(dit: nn.Module, lora: LoRA, strength: float = 1.0) -> int:
    """Replace each target Linear by a ``LoRALinear`` (enabled); returns how many were wrapped."""
    for name, (a, b, alpha) in lora.items():
        base = _target(dit, name, name)
        if isinstance(dit.get_submodule(name), LoRALinear):
            raise ValueError(f"{name!r} already carries a separate LoRA; merge one of them instead")
        parent, _, child = name.rpartition(".")
        dit.get_submodule(parent).register_module(child, LoRALinear(base, a, b, strength * _scale(a, alpha)))
    return len(lora)


def set_lora_enabled(module: nn.Module, enabled: bool) -> int:
    """Switch every separate LoRA inside ``module`` on or off; returns how many were switched."""
    layers = [m for m in module.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = enabled
    return len(layers)


def apply_lora(dit: nn.Module, path: str | Path, strength: float = 1.0, merge: bool = True) -> nn.Module:
    """Read ``path`` (checked against ``dit``) and merge it into ``dit`` or wrap it separately. Returns dit."""
    lora = read_lora(path, dit)
    n = merge_lora_(dit, lora, strength) if merge else wrap_lora_(dit, lora, strength)
    log.info("lora: %s %d linears from %s (strength %g)", "merged" if merge else "wrapped", n, path, strength)
    return dit


def check_lora_settings(settings: EngineSettings) -> None:
    """The separate (switchable) mode needs plain Linears through accel: refuse what would break it."""
    if settings.lora_merge or not (settings.lora_high_noise or settings.lora_low_noise):
        return
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
