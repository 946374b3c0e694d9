"""Reading LoRA files for the Wan2.2 DiT in every published key layout, each with its own trainer's scale.

A file becomes a ``LoRAFile``: low-rank pairs (down ``A`` [r, in], up ``B`` [out, r], and the scale the
trainer applies, so that ``W += strength * scale * (B @ A)``) and full deltas (``W += strength * delta``),
both keyed by OFFICIAL Wan names. The layouts (detected per key, so a file may mix them):

- PEFT / Diffusers: ``<prefix>.<module>.lora_A.weight`` / ``.lora_B.weight``, module names official or
  Diffusers (mapped by the one ``dit_keys`` table). PEFT keeps alpha OUTSIDE the tensors: scale =
  ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``; per-module ``rank_pattern`` /
  ``alpha_pattern`` override, a pattern ``p`` matching a module name ``(.*\\.)?p``): peft
  ``tuners/lora/layer.py`` ``LoraLayer.update_layer``. The config comes from the safetensors header key
  ``lora_adapter_metadata`` (JSON written by Diffusers' ``save_lora_weights``, keys prefixed by the
  component, e.g. ``{"transformer.r": 16, "transformer.lora_alpha": 1}``: diffusers
  ``loaders/lora_base.py`` ``LORA_ADAPTER_METADATA_KEY``; unprefixed when written by
  ``save_lora_adapter``, ``loaders/peft.py``) or from PEFT's ``adapter_config.json`` beside the file
  (``save_pretrained``). Without either, PEFT's default ``lora_alpha == r``: scale 1.
- Kohya / ComfyUI / LightX2V / VideoX-Fun: ``.lora_down.weight`` / ``.lora_up.weight`` plus an optional
  ``.alpha`` tensor: scale = alpha / r with r the down matrix's rows, 1 without alpha (ComfyUI
  ``comfy/weight_adapter/lora.py``; LightX2V ``tools/convert/lora_loader.py`` ``apply_lora``; VideoX-Fun
  ``videox_fun/utils/lora_utils.py`` ``merge_lora``, whose keys read ``lora_unet__blocks_0_self_attn_q``).
  A ``.alpha`` tensor wins over any config, as in those loaders.
- LightX2V's extractor (Wan2.1 lightx2v / CausVid, Wan2.2 distill LoRAs): besides alpha-less pairs, full
  deltas ``<module>.diff`` (weight: norms, ``patch_embedding``, ``head.head``), ``<module>.diff_b``
  (bias) and ``<block|head>.diff_m`` (``modulation``), added as ``W += strength * delta``
  (``lora_loader.py`` ``extract_lora_diffs`` / ``apply_lora``).
- DiffSynth-Studio: ``blocks.N.<module>.lora_A.default.weight`` (PEFT's adapter name kept), trained with
  ``lora_alpha = rank`` and merged by ``diffsynth/lora/__init__.py`` ``GeneralLoRALoader`` as
  ``W += alpha * (B @ A)`` with ``alpha`` the user's strength: scale 1. Checkpoints may keep the
  ``pipe.dit.`` prefix of the training module.

Prefixes stripped (repeatedly): ``base_model.model.`` (PEFT), ``model.diffusion_model.`` /
``diffusion_model.`` (ComfyUI / official), ``transformer.`` (Diffusers), ``pipe.dit.`` (DiffSynth),
``lora_unet__`` (VideoX-Fun) and ``lora_unet_`` (Kohya); Kohya names flatten dots to underscores.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn

from wanfast.loading.checkpoint import CheckpointError, require_file
from wanfast.loading.dit_keys import _DIFFUSERS  # the one official <-> Diffusers table, not a copy

_PREFIXES = (
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "pipe.dit.",
    "lora_unet__",
    "lora_unet_",
)
# key suffix -> role: A/B a low-rank pair, alpha its scale, diff* a full delta of the named parameter
_ROLES = (
    (".lora_A.default.weight", "A"),
    (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_down.weight", "A"),
    (".lora_up.weight", "B"),
    (".lora_B.default.bias", "Bb"),  # PEFT lora_bias (Diffusers stores LightX2V's diff_b so): scaled too
    (".lora_B.bias", "Bb"),
    (".alpha", "alpha"),
    (".diff", "weight"),
    (".diff_b", "bias"),
    (".diff_m", "modulation"),
)
# Wan2.1 I2V / FLF-14B modules (CLIP image projection, image cross-attention K/V), official and Diffusers
_WAN21_IMAGE = re.compile(
    r"(^|[._])(img_emb|k_img|v_img|norm_k_img|add_k_proj|add_v_proj|norm_added_k|image_embedder)"
)
_BLOCK = re.compile(r"^blocks([._])(\d+)(?:[._](.+))?$")  # blocks.N.<module>, or blocks.N (its modulation)


@cache
def published_params() -> dict[str, dict[str, tuple[int, ...]]]:
    """{published model: {official parameter: shape}}, from meta-device models (no memory, no files)."""
    from wanfast.models.dit import WanDiT
    from wanfast.specs import PUBLISHED, SPECS

    out = {}
    for name in PUBLISHED:
        with torch.device("meta"):
            dit = WanDiT(SPECS[name].dit)
        out[name] = {k: tuple(p.shape) for k, p in dit.named_parameters()}
    return out


@cache
def _tables() -> tuple[frozenset[str], dict[str, str]]:
    """(generic official parameter names, "*" for a block index; {alias module -> official module})."""
    params = frozenset(
        re.sub(r"^blocks\.\d+\.", "blocks.*.", k) for shapes in published_params().values() for k in shapes
    )
    modules = {p.rpartition(".")[0] for p in params} | {"blocks.*", "head"}
    alias = {o: o for o in modules} | {d: o for o, d in _DIFFUSERS if o in modules}
    alias |= {a.replace(".", "_"): o for a, o in list(alias.items())}  # Kohya flattens dots
    return params, alias


def _official(module: str) -> str | None:
    """A file's module name (any layout, prefix stripped) -> official module name, or None."""
    _, alias = _tables()
    m = _BLOCK.match(module)
    sep = m.group(1) if m else ""
    generic = (f"blocks{sep}*{sep}{m.group(3)}" if m.group(3) else f"blocks{sep}*") if m else module
    name = alias.get(generic)
    return name.replace("*", m.group(2)) if name is not None and m else name


def _strip(module: str) -> str:
    while True:
        prefix = next((p for p in _PREFIXES if module.startswith(p)), None)
        if prefix is None:
            return module
        module = module[len(prefix) :]


def _split_key(key: str) -> tuple[str, str, str]:
    """``key`` -> (file module name, official module name, role); CheckpointError naming the key."""
    suffix, role = next(((s, r) for s, r in _ROLES if key.endswith(s)), (None, None))
    module = _strip(key[: -len(suffix)]) if suffix else key
    if suffix and _WAN21_IMAGE.search(module):
        raise CheckpointError(
            f"LoRA key {key!r} targets the image cross-attention / CLIP image projection of a Wan2.1 I2V or "
            "FLF-14B model: no Wan2.2 model has that module (a Wan2.1 I2V LoRA?)"
        )
    name = _official(module) if suffix else None
    params, _ = _tables()
    param = f"{name}.{role}" if role in ("weight", "bias", "modulation") else f"{name}.weight"
    linear = role not in ("weight", "bias", "modulation") and name is not None
    if (
        name is None
        or re.sub(r"^blocks\.\d+\.", "blocks.*.", param) not in params
        or (linear and not _is_linear(param))
    ):
        raise CheckpointError(
            f"unknown LoRA key {key!r}: not a lora_A/lora_B/lora_down/lora_up/alpha pair of a Linear nor a "
            "diff/diff_b/diff_m delta of a Wan2.2 DiT parameter (a LoRA for another architecture?)"
        )
    return module, name, role


def _is_linear(param: str) -> bool:
    generic = re.sub(r"^blocks\.\d+\.", "blocks.0.", param)
    shape = next(iter(published_params().values())).get(generic)
    return shape is not None and len(shape) == 2 and not generic.endswith("modulation")


def fits(param: str, shape: tuple[int, ...]) -> list[str]:
    """The published models whose ``param`` has ``shape`` (for 'a LoRA for another model' messages)."""
    return [n for n, shapes in published_params().items() if shapes.get(param) == tuple(shape)]


def _kind_hint(param: str, shape: tuple[int, ...]) -> str:
    names = fits(param, shape)
    return f"a LoRA for {' / '.join(names)}" if names else "a LoRA for no published Wan2.2 model"


@dataclass
class LoRAFile:
    """A read LoRA file. ``pairs``: {official Linear: (A [r, in], B [out, r], scale)}; ``diffs``: {official
    parameter: delta of its shape}; ``keys``: {official target: a file key naming it, for errors}."""

    path: str
    pairs: dict[str, tuple[Tensor, Tensor, float]] = field(default_factory=dict)
    diffs: dict[str, Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    def targets(self) -> list[str]:
        """Every official parameter this file changes."""
        return [f"{n}.weight" for n in self.pairs] + list(self.diffs)


def peft_config(path: Path) -> dict | None:
    """The PEFT ``LoraConfig`` dict of a file: its ``lora_adapter_metadata`` header (the transformer's
    entries when prefixed by component), else ``adapter_config.json`` beside it, else None."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    if raw:
        meta = json.loads(raw)
        if not any("." in k for k in meta):  # unprefixed: one adapter's config (save_lora_adapter)
            return meta
        sub = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
        return sub or None  # prefixed per component, none of them the transformer
    beside = path.parent / "adapter_config.json"
    return json.loads(beside.read_text()) if beside.is_file() else None


def _pattern(patterns: dict, module: str, default: float) -> float:
    # peft: a pattern key k applies to modules named "(.*\.)?k"; the first key that matches wins
    return next((v for k, v in patterns.items() if re.fullmatch(rf"(?:.*\.)?(?:{k})", module)), default)


def _peft_scale(cfg: dict, module: str, rank: int | None, key: str) -> float:
    """PEFT's scaling of ``module`` (defaults as ``LoraConfig``: r 8, lora_alpha 8); the config's rank must
    be the tensors' (``rank``), else the config belongs to another adapter and its scale would be wrong."""
    r = _pattern(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8))
    alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
    if rank is not None and r != rank:
        raise CheckpointError(f"LoRA key {key!r}: rank {rank}, but the file's PEFT config says r={r}")
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _target(dit: nn.Module, param: str, key: str, linear: bool = False) -> Tensor:
    """The parameter ``param`` of ``dit`` (a Linear's weight through a separate-mode wrapper)."""
    module, _, attr = param.rpartition(".")
    try:
        mod = dit.get_submodule(module)
    except AttributeError:
        held = [n for n, shapes in published_params().items() if param in shapes]
        where = f"a LoRA for {' / '.join(held)}" if held else "a LoRA for no published Wan2.2 model"
        raise CheckpointError(
            f"LoRA key {key!r} targets {module!r}, which this model lacks ({where})"
        ) from None
    mod = getattr(mod, "base", mod)  # LoRALinear keeps the plain Linear as .base
    if linear and not isinstance(mod, nn.Linear):
        raise CheckpointError(f"LoRA key {key!r} targets {module!r}, a {type(mod).__name__}, not a Linear")
    return getattr(mod, attr)


def read_lora(path: str | Path, dit: nn.Module | None = None) -> LoRAFile:
    """Read a LoRA ``.safetensors`` file (any layout of the module docstring). With ``dit`` (a real or
    meta-device model), every target is checked against its shapes; errors name the file's key and, for a
    shape of another Wan2.2 model, which one it fits."""
    from safetensors.torch import load_file

    path = require_file(path, "LoRA file")
    raw = load_file(str(path))
    if not raw:
        raise CheckpointError(f"LoRA file {path} holds no tensors")
    parts: dict[str, dict[str, Tensor]] = {}
    out = LoRAFile(str(path))
    names: dict[str, str] = {}  # official module -> file module name (PEFT patterns use the file's names)
    for key, tensor in raw.items():
        module, name, role = _split_key(key)
        if role in ("weight", "bias", "modulation") or role == "Bb":
            param = f"{name}.{'bias' if role == 'Bb' else role}"
            if param in out.keys:
                raise CheckpointError(f"LoRA key {key!r}: a second delta for {param!r}")
            out.keys[param] = key
            if role != "Bb":
                out.diffs[param] = tensor
                continue
        if role in parts.setdefault(name, {}):
            raise CheckpointError(f"LoRA key {key!r}: a second {role} for module {name!r}")
        parts[name][role], names[name] = tensor, module
        if role == "A" or (role != "Bb" and f"{name}.weight" not in out.keys):  # the down key, if any
            out.keys[f"{name}.weight"] = key
    cfg = peft_config(path) if parts else None
    for name, p in parts.items():
        if "Bb" in p:  # PEFT adds lora_B's bias inside the scaled branch: scale * b
            rank = p["A"].shape[0] if "A" in p else None
            scale = _peft_scale(cfg, names[name], rank, out.keys[f"{name}.bias"]) if cfg else 1.0
            out.diffs[f"{name}.bias"] = p["Bb"].float() * scale
            if "A" not in p and "B" not in p:
                continue
        key = out.keys[f"{name}.weight"]
        if "A" not in p or "B" not in p:
            raise CheckpointError(
                f"LoRA key {key!r}: module {name!r} lacks its {'B' if 'A' in p else 'A'} (up/down) matrix"
            )
        a, b = p["A"], p["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"LoRA key {key!r}: down {tuple(a.shape)} and up {tuple(b.shape)} are not a rank-r pair"
            )
        if "alpha" in p:
            scale = float(p["alpha"].item()) / a.shape[0]
        else:
            scale = _peft_scale(cfg, names[name], a.shape[0], key) if cfg else 1.0
        out.pairs[name] = (a, b, scale)
    if dit is not None:
        check_shapes(out, dit)
    return out


def check_shapes(lora: LoRAFile, dit: nn.Module) -> None:
    """Every target of ``lora`` exists in ``dit`` with its shape; CheckpointError naming the key if not."""
    for name, (a, b, _) in lora.pairs.items():
        key, param = lora.keys[f"{name}.weight"], f"{name}.weight"
        w = _target(dit, param, key, linear=True)
        shape = (b.shape[0], a.shape[1])
        if shape != tuple(w.shape):
            raise CheckpointError(
                f"LoRA key {key!r}: update {shape[0]}x{shape[1]} does not fit {name!r} weight "
                f"{tuple(w.shape)} ({_kind_hint(param, shape)})"
            )
    for param, d in lora.diffs.items():
        key = lora.keys[param]
        w = _target(dit, param, key)
        if tuple(d.shape) != tuple(w.shape):
            raise CheckpointError(
                f"LoRA key {key!r}: delta {tuple(d.shape)} does not fit {param!r} {tuple(w.shape)} "
                f"({_kind_hint(param, tuple(d.shape))})"
            )


def delta(lora: LoRAFile, param: str, strength: float, like: Tensor) -> Tensor:
    """``strength`` times the update of ``param`` in float32 on ``like``'s device: low-precision products
    would lose the small update; the caller adds it to W in float32 and casts once."""
    dev = like.device
    if param in lora.diffs:
        return lora.diffs[param].to(dev, torch.float32) * strength
    a, b, scale = lora.pairs[param.removesuffix(".weight")]
    return (b.to(dev, torch.float32) @ a.to(dev, torch.float32)) * (strength * scale)
