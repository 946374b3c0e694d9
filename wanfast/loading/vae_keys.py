"""Wan2.1 VAE checkpoints: official ``Wan2.1_VAE.pth`` keys <-> Diffusers ``AutoencoderKLWan`` keys, and
the architecture read from either (tensor shapes, or the Diffusers ``vae/config.json``).

A key is ``<block>.<leaf>``. ``_BLOCKS`` renames blocks and ``_LEAVES`` the names inside them; both tables
are read in either direction. One structural difference remains: the official decoder keeps one flat list
``decoder.upsamples.K`` (per stage: num_res_blocks + 1 residual blocks, then a resampler), which Diffusers
nests as ``decoder.up_blocks.B.resnets.R`` / ``decoder.up_blocks.B.upsamplers.0``.
"""

from __future__ import annotations

import re

import torch

from wanfast.config import ConfigError, VAEConfig

# (official, diffusers) block paths; "{n}" is an index carried over unchanged.
_BLOCKS = [
    ("conv1", "quant_conv"),
    ("conv2", "post_quant_conv"),
    ("encoder.conv1", "encoder.conv_in"),
    ("encoder.downsamples.{n}", "encoder.down_blocks.{n}"),
    ("encoder.middle.0", "encoder.mid_block.resnets.0"),
    ("encoder.middle.1", "encoder.mid_block.attentions.0"),
    ("encoder.middle.2", "encoder.mid_block.resnets.1"),
    ("encoder.head.0", "encoder.norm_out"),
    ("encoder.head.2", "encoder.conv_out"),
    ("decoder.conv1", "decoder.conv_in"),
    ("decoder.middle.0", "decoder.mid_block.resnets.0"),
    ("decoder.middle.1", "decoder.mid_block.attentions.0"),
    ("decoder.middle.2", "decoder.mid_block.resnets.1"),
    ("decoder.upsamples.{n}", "decoder.up_blocks.{n}"),  # {n} flat here; see _nest / _flatten
    ("decoder.head.0", "decoder.norm_out"),
    ("decoder.head.2", "decoder.conv_out"),
]

# (official, diffusers) names inside a block: residual blocks differ, the rest is shared.
_SHARED = ("weight", "bias", "gamma", "norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias",
           "resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")  # fmt: skip
_LEAVES = [
    ("residual.0.gamma", "norm1.gamma"),
    ("residual.2.weight", "conv1.weight"),
    ("residual.2.bias", "conv1.bias"),
    ("residual.3.gamma", "norm2.gamma"),
    ("residual.6.weight", "conv2.weight"),
    ("residual.6.bias", "conv2.bias"),
    ("shortcut.weight", "conv_shortcut.weight"),
    ("shortcut.bias", "conv_shortcut.bias"),
    *((name, name) for name in _SHARED),
]


def _block_regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\{n\}", r"(?P<n>\d+)") + r"\.(?P<leaf>.+)")


_BLOCK_RES = [tuple(_block_regex(p) for p in pair) for pair in _BLOCKS]
_LEAF_MAPS = [{pair[s]: pair[1 - s] for pair in _LEAVES} for s in (0, 1)]  # [0]: official -> diffusers


def _rename(key: str, src: int) -> str:
    """Rename one key from layout ``src`` (0 official, 1 diffusers with a flat decoder) to the other."""
    for pair, regexes in zip(_BLOCKS, _BLOCK_RES, strict=True):
        m = regexes[src].fullmatch(key)
        if m and m["leaf"] in _LEAF_MAPS[src]:
            block = pair[1 - src].replace("{n}", m.groupdict().get("n") or "")
            return f"{block}.{_LEAF_MAPS[src][m['leaf']]}"
    layout = ("official", "Diffusers")[src]
    raise KeyError(f"unknown Wan2.1 VAE key {key!r} in a {layout}-layout state dict")


_ENCODER_LIST = re.compile(r"encoder\.(?:downsamples|down_blocks)\.(\d+)\.(.+)")


def _num_res_blocks(keys) -> int:
    """Residual blocks per encoder stage = index of the first resampler in the encoder's flat list (the
    same list and indices in both layouts), or the whole list when there is a single stage."""
    found = [(int(m[1]), m[2]) for k in keys if (m := _ENCODER_LIST.fullmatch(k))]
    resamplers = [i for i, leaf in found if leaf == "resample.1.weight"]
    if resamplers:
        return min(resamplers)
    if not found:
        raise KeyError("cannot map the decoder: no encoder.downsamples / encoder.down_blocks keys")
    return 1 + max(i for i, _ in found)


_FLAT_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(.+)")
_NESTED_UP = re.compile(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.+)")


def _nest(key: str, nrb: int) -> str:
    """Flat ``decoder.up_blocks.K.x`` -> ``decoder.up_blocks.B.resnets.R.x`` or ``B.upsamplers.0.x``."""
    m = _FLAT_UP.fullmatch(key)
    if not m:
        return key
    b, r = divmod(int(m[1]), nrb + 2)  # a stage: nrb + 1 residual blocks, then the upsampler
    inner = f"resnets.{r}" if r <= nrb else "upsamplers.0"
    return f"decoder.up_blocks.{b}.{inner}.{m[2]}"


def _flatten(key: str, nrb: int) -> str:
    """The inverse of ``_nest``."""
    m = _NESTED_UP.fullmatch(key)
    if not m:
        if key.startswith("decoder.up_blocks."):
            raise KeyError(f"unknown Wan2.1 VAE key {key!r} in a Diffusers-layout state dict")
        return key
    r = nrb + 1 if m[2] is None else int(m[2])  # the upsampler comes after the nrb + 1 resnets
    if m[2] is not None and r > nrb:
        raise KeyError(f"unknown Wan2.1 VAE key {key!r}: up block has {nrb + 1} resnets")
    return f"decoder.up_blocks.{int(m[1]) * (nrb + 2) + r}.{m[3]}"


def official_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``Wan2.1_VAE.pth`` keys -> Diffusers ``AutoencoderKLWan`` keys (tensors shared, not copied)."""
    flat = {_rename(k, 0): v for k, v in sd.items()}
    if not any(k.startswith("decoder.up_blocks.") for k in flat):
        return flat
    nrb = _num_res_blocks(sd)
    return {_nest(k, nrb): v for k, v in flat.items()}


def diffusers_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers ``AutoencoderKLWan`` keys -> official keys (the names ``wanfast.models.vae.WanVAE`` uses)."""
    if any(k.startswith("decoder.up_blocks.") for k in sd):
        nrb = _num_res_blocks(sd)
        sd = {_flatten(k, nrb): v for k, v in sd.items()}
    return {_rename(k, 1): v for k, v in sd.items()}


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> VAEConfig:
    """The architecture of an official-keyed state dict, from tensor shapes and which keys exist.

    The encoder's flat ``downsamples`` list is num_res_blocks residual blocks per stage with a resampler
    between stages; a resampler with a ``time_conv`` also halves time. Latent mean/std are not in the
    checkpoint: the Wan2.1 values (``VAEConfig`` defaults) are used for z_dim 16, identity otherwise.
    """
    try:
        dim = sd["encoder.conv1.weight"].shape[0]
        z_dim = sd["conv2.weight"].shape[0]
    except KeyError as e:
        raise ConfigError(f"not a Wan2.1 VAE state dict (official layout): no {e.args[0]}") from None
    idx = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
    if idx != list(range(len(idx))) or not idx:
        raise ConfigError(f"encoder.downsamples indices are not 0..N-1: {idx[:8]}")
    stages: list[list[int]] = [[]]  # output channels of each residual block, per stage
    temporal: list[bool] = []
    for i in idx:
        p = f"encoder.downsamples.{i}."
        if p + "resample.1.weight" in sd:
            temporal.append(p + "time_conv.weight" in sd)
            stages.append([])
        elif p + "residual.6.weight" in sd:
            stages[-1].append(sd[p + "residual.6.weight"].shape[0])
        else:
            raise ConfigError(
                f"encoder.downsamples.{i} is neither a residual block nor a resampler "
                "(attention in the down path, or a Wan2.2 VAE, is not supported)"
            )
    nrb = len(stages[0])
    if nrb == 0 or any(len(s) != nrb for s in stages) or any(c % dim for s in stages for c in s):
        raise ConfigError(f"irregular encoder stages (residual block widths per stage: {stages})")
    wan21 = VAEConfig()
    known = z_dim == wan21.z_dim
    return VAEConfig(
        dim=dim,
        z_dim=z_dim,
        dim_mult=tuple(s[-1] // dim for s in stages),
        num_res_blocks=nrb,
        temporal_downsample=tuple(temporal),
        latents_mean=wan21.latents_mean if known else (0.0,) * z_dim,
        latents_std=wan21.latents_std if known else (1.0,) * z_dim,
    )


def diffusers_config_json(cfg: VAEConfig) -> dict:
    """The ``vae/config.json`` fields of a Diffusers ``AutoencoderKLWan`` with this architecture."""
    return {
        "_class_name": "AutoencoderKLWan",
        "base_dim": cfg.dim,
        "z_dim": cfg.z_dim,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(cfg.temporal_downsample),  # sic: Diffusers' spelling
        "dropout": 0.0,
        "latents_mean": list(cfg.latents_mean),
        "latents_std": list(cfg.latents_std),
    }


def config_from_diffusers_json(d: dict) -> VAEConfig:
    """``VAEConfig`` from a Diffusers ``vae/config.json`` dict; missing fields take Diffusers' defaults."""
    if d.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ConfigError(f"expected an AutoencoderKLWan config, got {d.get('_class_name')!r}")
    base = d.get("base_dim", 96)
    unsupported = {
        "is_residual": bool(d.get("is_residual")),
        "attn_scales": bool(d.get("attn_scales")),
        "patch_size": d.get("patch_size") is not None,
        "decoder_base_dim": d.get("decoder_base_dim") not in (None, base),
        "in_channels": d.get("in_channels", 3) != 3,
        "out_channels": d.get("out_channels", 3) != 3,
    }
    if bad := [k for k, v in unsupported.items() if v]:
        raise ConfigError(f"unsupported AutoencoderKLWan settings {bad} (only the Wan2.1 VAE is supported)")
    defaults, temporal = VAEConfig(), "temperal_downsample"  # sic: Diffusers' spelling
    return VAEConfig(
        dim=int(base),
        z_dim=int(d.get("z_dim", defaults.z_dim)),
        dim_mult=tuple(int(m) for m in d.get("dim_mult", defaults.dim_mult)),
        num_res_blocks=int(d.get("num_res_blocks", defaults.num_res_blocks)),
        temporal_downsample=tuple(bool(t) for t in d.get(temporal, defaults.temporal_downsample)),
        latents_mean=tuple(float(v) for v in d.get("latents_mean", defaults.latents_mean)),
        latents_std=tuple(float(v) for v in d.get("latents_std", defaults.latents_std)),
    )
