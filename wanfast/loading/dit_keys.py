"""DiT state-dict key maps and config.json readers/writers for the official and Diffusers layouts.

Pure functions, no file I/O. Our ``WanDiT`` uses the official names, so the official layout needs no
renaming; the Diffusers layout is mapped by the one table ``_DIFFUSERS`` applied in both directions.
"""

from __future__ import annotations

import re

from torch import Tensor

from wanfast.config import ConfigError, DiTConfig

# (official, diffusers) names of modules or parameters; "*" stands for a block index. A key matches an
# entry on its full name (parameters such as ``modulation``) or on its module path plus ".weight"/".bias".
# Note the swapped block norms: Diffusers norm2 is the affine cross-attention norm (official norm3), and
# the parameter-free official norm2 / norm1 have no keys at all.
_DIFFUSERS: list[tuple[str, str]] = [
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("blocks.*.modulation", "blocks.*.scale_shift_table"),  # [1, 6, dim]
    ("blocks.*.self_attn.q", "blocks.*.attn1.to_q"),
    ("blocks.*.self_attn.k", "blocks.*.attn1.to_k"),
    ("blocks.*.self_attn.v", "blocks.*.attn1.to_v"),
    ("blocks.*.self_attn.o", "blocks.*.attn1.to_out.0"),
    ("blocks.*.self_attn.norm_q", "blocks.*.attn1.norm_q"),
    ("blocks.*.self_attn.norm_k", "blocks.*.attn1.norm_k"),
    ("blocks.*.norm3", "blocks.*.norm2"),
    ("blocks.*.cross_attn.q", "blocks.*.attn2.to_q"),
    ("blocks.*.cross_attn.k", "blocks.*.attn2.to_k"),
    ("blocks.*.cross_attn.v", "blocks.*.attn2.to_v"),
    ("blocks.*.cross_attn.o", "blocks.*.attn2.to_out.0"),
    ("blocks.*.cross_attn.norm_q", "blocks.*.attn2.norm_q"),
    ("blocks.*.cross_attn.norm_k", "blocks.*.attn2.norm_k"),
    ("blocks.*.ffn.0", "blocks.*.ffn.net.0.proj"),
    ("blocks.*.ffn.2", "blocks.*.ffn.net.2"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),  # [1, 2, dim]
]
_TO_DIFFUSERS = dict(_DIFFUSERS)
_TO_OFFICIAL = {d: o for o, d in _DIFFUSERS}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_PARAM_SUFFIXES = ("weight", "bias")


def _rename(key: str, table: dict[str, str], what: str) -> str:
    m = _BLOCK.match(key)
    generic = _BLOCK.sub("blocks.*.", key) if m else key
    if generic in table:
        new = table[generic]
    else:
        module, _, param = generic.rpartition(".")
        if param not in _PARAM_SUFFIXES or module not in table:
            raise KeyError(f"unknown {what} DiT key {key!r} (not a Wan2.2 t2v transformer parameter)")
        new = f"{table[module]}.{param}"
    return new.replace("*", m.group(1)) if m else new


def diffusers_to_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers ``WanTransformer3DModel`` keys -> official ``WanModel`` keys (tensors unchanged)."""
    return {_rename(k, _TO_OFFICIAL, "Diffusers"): v for k, v in sd.items()}


def official_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official ``WanModel`` keys -> Diffusers ``WanTransformer3DModel`` keys (tensors unchanged)."""
    return {_rename(k, _TO_DIFFUSERS, "official"): v for k, v in sd.items()}


# Defaults of the official WanModel for the arguments its config.json does not record
# (``ignore_for_config``: patch_size, cross_attn_norm, qk_norm, text_dim, window_size).
_OFFICIAL_UNRECORDED = {"patch_size": (1, 2, 2), "text_dim": 4096, "qk_norm": True, "cross_attn_norm": True}
_SUPPORTED_TYPES = ("t2v", "ti2v", "i2v")


def config_from_official_json(d: dict) -> DiTConfig:
    """DiTConfig from an official expert ``config.json`` (e.g. high_noise_model/config.json)."""
    model_type = d.get("model_type", "t2v")
    if model_type not in _SUPPORTED_TYPES:
        raise ConfigError(
            f"official DiT model_type {model_type!r} is not supported (only {_SUPPORTED_TYPES})"
        )
    try:
        return DiTConfig(
            dim=int(d["dim"]),
            ffn_dim=int(d["ffn_dim"]),
            num_heads=int(d["num_heads"]),
            num_layers=int(d["num_layers"]),
            freq_dim=int(d.get("freq_dim", 256)),
            text_len=int(d.get("text_len", 512)),
            text_dim=int(d.get("text_dim", _OFFICIAL_UNRECORDED["text_dim"])),
            in_dim=int(d.get("in_dim", 16)),
            out_dim=int(d.get("out_dim", 16)),
            patch_size=tuple(d.get("patch_size", _OFFICIAL_UNRECORDED["patch_size"])),
            eps=float(d.get("eps", 1e-6)),
            qk_norm=bool(d.get("qk_norm", True)),
            cross_attn_norm=bool(d.get("cross_attn_norm", True)),
        )
    except KeyError as e:
        raise ConfigError(f"official DiT config.json lacks the key {e.args[0]!r}") from None


def official_config_json(cfg: DiTConfig, model_type: str = "t2v") -> dict:
    """An official-style ``config.json`` for ``cfg``. Arguments the real files omit are written only when
    they differ from the WanModel defaults (so the 14B config equals the published file), except the text
    width, which the published files never record: readers take it from ``text_embedding.0.weight``."""
    d = {
        "_class_name": "WanModel",
        "_diffusers_version": "0.33.0",
        "dim": cfg.dim,
        "eps": cfg.eps,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "in_dim": cfg.in_dim,
        "model_type": model_type,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "out_dim": cfg.out_dim,
        "text_len": cfg.text_len,
    }
    extra = {"patch_size": cfg.patch_size, "qk_norm": cfg.qk_norm}
    extra["cross_attn_norm"] = cfg.cross_attn_norm
    for k, v in extra.items():
        if v != _OFFICIAL_UNRECORDED[k]:
            d[k] = list(v) if isinstance(v, tuple) else v
    return d


def config_from_diffusers_json(d: dict, text_len: int | None = None) -> DiTConfig:
    """DiTConfig from a Diffusers ``transformer/config.json``.

    Diffusers keeps the text length in the pipeline (max_sequence_length=512), not here: ``text_len``
    overrides, else a non-standard "text_len" key (written for tiny test models), else 512.
    """
    if d.get("image_dim") is not None or d.get("added_kv_proj_dim") is not None:
        raise ConfigError("Diffusers DiT config has image conditioning (I2V): only T2V is supported")
    qk_norm = d.get("qk_norm", "rms_norm_across_heads")
    if qk_norm != "rms_norm_across_heads":
        raise ConfigError(
            f"Diffusers qk_norm {qk_norm!r} is not supported (Wan uses 'rms_norm_across_heads')"
        )
    try:
        heads, head_dim = int(d["num_attention_heads"]), int(d["attention_head_dim"])
        return DiTConfig(
            dim=heads * head_dim,
            ffn_dim=int(d["ffn_dim"]),
            num_heads=heads,
            num_layers=int(d["num_layers"]),
            freq_dim=int(d.get("freq_dim", 256)),
            text_len=int(text_len if text_len is not None else d.get("text_len", 512)),
            text_dim=int(d.get("text_dim", 4096)),
            in_dim=int(d.get("in_channels", 16)),
            out_dim=int(d.get("out_channels") or d.get("in_channels", 16)),
            patch_size=tuple(d.get("patch_size", (1, 2, 2))),
            eps=float(d.get("eps", 1e-6)),
            qk_norm=True,
            cross_attn_norm=bool(d.get("cross_attn_norm", True)),
        )
    except KeyError as e:
        raise ConfigError(f"Diffusers DiT config.json lacks the key {e.args[0]!r}") from None


def diffusers_config_json(cfg: DiTConfig) -> dict:
    """A Diffusers-style ``transformer/config.json`` for ``cfg`` (loadable by WanTransformer3DModel).
    "text_len" (not a Diffusers argument, ignored by it) is added only when it is not the standard 512."""
    if not cfg.qk_norm:
        raise ConfigError(
            "the Diffusers WanTransformer3DModel always has q/k RMSNorm: qk_norm=False is not expressible"
        )
    d = {
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": "0.35.0.dev0",
        "added_kv_proj_dim": None,
        "attention_head_dim": cfg.head_dim,
        "cross_attn_norm": cfg.cross_attn_norm,
        "eps": cfg.eps,
        "ffn_dim": cfg.ffn_dim,
        "freq_dim": cfg.freq_dim,
        "image_dim": None,
        "in_channels": cfg.in_dim,
        "num_attention_heads": cfg.num_heads,
        "num_layers": cfg.num_layers,
        "out_channels": cfg.out_dim,
        "patch_size": list(cfg.patch_size),
        "pos_embed_seq_len": None,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 1024,
        "text_dim": cfg.text_dim,
    }
    if cfg.text_len != 512:
        d["text_len"] = cfg.text_len
    return d
