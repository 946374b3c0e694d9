"""Wan2.2 VAE checkpoints: official ``Wan2.2_VAE.pth`` keys <-> Diffusers ``AutoencoderKLWan``
(``is_residual=True``) keys, the architecture read from either (tensor shapes, or ``vae/config.json``), and
which VAE a checkpoint holds.

Outside the stages the names are the Wan2.1 ones (``vae_keys._BLOCKS``: conv1 <-> quant_conv, middle <->
mid_block, head <-> norm_out / conv_out ...). A stage is a two-level list in the official layout and a block
with named parts in Diffusers':

    encoder.downsamples.S.downsamples.J.<residual leaf>  <->  encoder.down_blocks.S.resnets.J.<leaf>
    encoder.downsamples.S.downsamples.N.<resample leaf>  <->  encoder.down_blocks.S.downsampler.<leaf>
    decoder.upsamples.S.upsamples.J.<residual leaf>      <->  decoder.up_blocks.S.resnets.J.<leaf>
    decoder.upsamples.S.upsamples.N.<resample leaf>      <->  decoder.up_blocks.S.upsampler.<leaf>

where N (the resampler's index) is the stage's residual block count. The shortcuts have no weights.
"""

from __future__ import annotations

import math
import re

import torch

from wanfast.config import ConfigError, VAE22Config, VAEConfig
from wanfast.loading.vae_keys import _BLOCKS, _LEAF_MAPS, _block_regex
from wanfast.models.vae22 import Wan22VAE

# (official, diffusers) blocks that are not stage lists: named exactly as in the Wan2.1 VAE.
_FIXED = [pair for pair in _BLOCKS if "{n}" not in pair[0]]
_FIXED_RES = [tuple(_block_regex(p) for p in pair) for pair in _FIXED]
# Leaves of a residual block (official -> diffusers) and of a resampler (same in both layouts).
_RES_LEAVES = {k: v for k, v in _LEAF_MAPS[0].items() if k.startswith(("residual.", "shortcut."))}
_RES_LEAVES_BACK = {v: k for k, v in _RES_LEAVES.items()}
_RESAMPLE_LEAVES = {"resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias"}
# (official list, diffusers list, diffusers resampler name) per side.
_STAGES = [("encoder.downsamples", "encoder.down_blocks", "downsampler"),
           ("decoder.upsamples", "decoder.up_blocks", "upsampler")]  # fmt: skip
_OFFICIAL_RES = [re.compile(rf"{re.escape(o)}\.(\d+)\.{o.split('.')[1]}\.(\d+)\.(.+)") for o, _, _ in _STAGES]
_DIFF_RESNET_RES = [re.compile(rf"{re.escape(d)}\.(\d+)\.resnets\.(\d+)\.(.+)") for _, d, _ in _STAGES]
_DIFF_SAMPLER_RES = [re.compile(rf"{re.escape(d)}\.(\d+)\.{s}\.(.+)") for _, d, s in _STAGES]


def _unknown(key: str, src: int) -> KeyError:
    return KeyError(f"unknown Wan2.2 VAE key {key!r} in a {('official', 'Diffusers')[src]}-layout state dict")


def _rename_fixed(key: str, src: int) -> str:
    for pair, regexes in zip(_FIXED, _FIXED_RES, strict=True):
        m = regexes[src].fullmatch(key)
        if m and m["leaf"] in _LEAF_MAPS[src]:
            return f"{pair[1 - src]}.{_LEAF_MAPS[src][m['leaf']]}"
    raise _unknown(key, src)


def _to_diffusers(key: str) -> str:
    for (_, diff, sampler), regex in zip(_STAGES, _OFFICIAL_RES, strict=True):
        if m := regex.fullmatch(key):
            s, j, leaf = m.groups()
            if leaf in _RESAMPLE_LEAVES:
                return f"{diff}.{s}.{sampler}.{leaf}"
            if leaf in _RES_LEAVES:
                return f"{diff}.{s}.resnets.{j}.{_RES_LEAVES[leaf]}"
            raise _unknown(key, 0)
    return _rename_fixed(key, 0)


def official_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``Wan2.2_VAE.pth`` keys -> Diffusers ``AutoencoderKLWan`` keys (tensors shared, not
    copied)."""
    return {_to_diffusers(k): v for k, v in sd.items()}


def diffusers_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers keys -> official keys (the names ``wanfast.models.vae22.Wan22VAE`` uses)."""
    resnets: dict[tuple[int, str], int] = {}  # (side, stage) -> residual blocks in it = resampler index
    for side, regex in enumerate(_DIFF_RESNET_RES):
        for k in sd:
            if m := regex.fullmatch(k):
                resnets[side, m[1]] = max(resnets.get((side, m[1]), 0), int(m[2]) + 1)
    out = {}
    for key, v in sd.items():
        new = None
        for side, (off, _, _) in enumerate(_STAGES):
            inner = off.split(".")[1]
            if (m := _DIFF_RESNET_RES[side].fullmatch(key)) and m[3] in _RES_LEAVES_BACK:
                new = f"{off}.{m[1]}.{inner}.{m[2]}.{_RES_LEAVES_BACK[m[3]]}"
            elif (m := _DIFF_SAMPLER_RES[side].fullmatch(key)) and m[2] in _RESAMPLE_LEAVES:
                if (side, m[1]) not in resnets:
                    raise KeyError(f"Wan2.2 VAE key {key!r}: a resampler in a stage with no residual blocks")
                new = f"{off}.{m[1]}.{inner}.{resnets[side, m[1]]}.{m[2]}"
        if new is None:
            if any(key.startswith(f"{d}.") for _, d, _ in _STAGES):
                raise _unknown(key, 1)
            new = _rename_fixed(key, 1)
        out[new] = v
    return out


def is_wan22_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """Whether ``sd`` (official or Diffusers keys) holds a Wan2.2 VAE: its encoder stages are two-level
    (``encoder.downsamples.S.downsamples.J`` / ``encoder.down_blocks.S.resnets.J``); Wan2.1's are one flat
    list (``encoder.downsamples.K`` / ``encoder.down_blocks.K``)."""
    return any(_OFFICIAL_RES[0].fullmatch(k) or _DIFF_RESNET_RES[0].fullmatch(k) for k in sd)


def is_wan22_diffusers_config(d: dict) -> bool:
    """Whether a Diffusers ``vae/config.json`` dict describes a Wan2.2 VAE (``is_residual``: the residual
    stages that make the architecture; the Wan2.1 VAE leaves it false)."""
    return d.get("_class_name", "AutoencoderKLWan") == "AutoencoderKLWan" and bool(d.get("is_residual"))


def _latent_stats(z_dim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Latent mean/std are not in the weights: the published values for z_dim 48 (Wan2.2) and 16
    (Wan2.1), identity otherwise (random test models)."""
    for known in (VAE22Config(), VAEConfig()):
        if known.z_dim == z_dim:
            return known.latents_mean, known.latents_std
    return (0.0,) * z_dim, (1.0,) * z_dim


def _stages(sd: dict[str, torch.Tensor], side: int) -> list[tuple[list[int], str | None]]:
    """Per stage of one side (official keys): the output widths of its residual blocks and its resampler
    ("2d", "3d", or None), from which keys exist."""
    found: dict[int, dict[int, set[str]]] = {}
    for k in sd:
        if m := _OFFICIAL_RES[side].fullmatch(k):
            found.setdefault(int(m[1]), {}).setdefault(int(m[2]), set()).add(m[3])
    if sorted(found) != list(range(len(found))) or not found:
        raise ConfigError(f"{_STAGES[side][0]} stage indices are not 0..N-1: {sorted(found)[:8]}")
    prefix = _STAGES[side][0]
    inner, stages = prefix.split(".")[1], []
    for s in range(len(found)):
        widths, sampler = [], None
        for j in sorted(found[s]):
            leaves = found[s][j]
            if j != len(widths) or sampler is not None:
                raise ConfigError(f"{prefix}.{s}: block {j} is out of order")
            if "resample.1.weight" in leaves:
                sampler = "3d" if "time_conv.weight" in leaves else "2d"
            elif "residual.6.weight" in leaves:
                widths.append(sd[f"{prefix}.{s}.{inner}.{j}.residual.6.weight"].shape[0])
            else:
                raise ConfigError(f"{prefix}.{s}.{inner}.{j} is neither a residual block nor a resampler")
        stages.append((widths, sampler))
    return stages


def config_from_state_dict(sd: dict[str, torch.Tensor]) -> VAE22Config:
    """The architecture of a Wan2.2 VAE state dict (official or Diffusers keys), from tensor shapes and which
    keys exist: widths from the convs, residual blocks and temporal resamplers per stage from the keys."""
    if "encoder.conv_in.weight" in sd:
        sd = diffusers_to_official(sd)
    try:
        dim, cin = sd["encoder.conv1.weight"].shape[:2]
        z_dim = sd["conv2.weight"].shape[0]
        dec_in = sd["decoder.conv1.weight"].shape[0]
    except KeyError as e:
        raise ConfigError(f"not a Wan2.2 VAE state dict: no {e.args[0]}") from None
    p = math.isqrt(cin // 3)
    if 3 * p * p != cin:
        raise ConfigError(f"encoder.conv1 takes {cin} channels, not 3 * patch_size**2")
    enc, dec = _stages(sd, 0), _stages(sd, 1)
    nrb = len(enc[0][0])
    mult = tuple(w[-1] // dim if w else 0 for w, _ in enc)
    if (
        nrb == 0 or any(len(w) != nrb or set(w) != {dim * m} for (w, _), m in zip(enc, mult, strict=True))
        or any(s is None for _, s in enc[:-1]) or enc[-1][1] is not None
    ):  # fmt: skip
        raise ConfigError(f"irregular encoder stages (widths and resamplers): {enc}")
    if dec_in % mult[-1]:
        raise ConfigError(f"decoder.conv1 makes {dec_in} channels, not a multiple of {mult[-1]}")
    dec_dim = dec_in // mult[-1]
    temporal = tuple(s == "3d" for _, s in enc[:-1])
    # Decoder stage i: nrb + 1 blocks of dec_dim * mult[-1 - i] channels, then the mirror of encoder
    # stage n - 2 - i's resampler (none after the last stage).
    samplers = [("3d" if t else "2d") for t in reversed(temporal)] + [None]
    want = [([dec_dim * m] * (nrb + 1), s) for m, s in zip(reversed(mult), samplers, strict=True)]
    if dec != want:
        raise ConfigError(f"decoder stages {dec} do not mirror the encoder's (expected {want})")
    mean, std = _latent_stats(z_dim)
    return VAE22Config(
        dim=dim, dec_dim=dec_dim, z_dim=z_dim, dim_mult=mult, num_res_blocks=nrb,
        temporal_downsample=temporal, patch_size=p, latents_mean=mean, latents_std=std,
    )  # fmt: skip


def diffusers_config_json(cfg: VAE22Config) -> dict:
    """The ``vae/config.json`` fields of a Diffusers ``AutoencoderKLWan`` with this architecture (the
    Wan2.2-TI2V-5B-Diffusers one for the default config)."""
    io = 3 * cfg.patch_size**2
    return {
        "_class_name": "AutoencoderKLWan",
        "base_dim": cfg.dim,
        "decoder_base_dim": cfg.dec_dim,
        "z_dim": cfg.z_dim,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": list(cfg.temporal_downsample),  # sic: Diffusers' spelling
        "dropout": 0.0,
        "is_residual": True,
        "in_channels": io,
        "out_channels": io,
        "patch_size": cfg.patch_size,
        "scale_factor_temporal": cfg.temporal_stride,
        "scale_factor_spatial": cfg.spatial_stride,
        "latents_mean": list(cfg.latents_mean),
        "latents_std": list(cfg.latents_std),
    }


def config_from_diffusers_json(d: dict) -> VAE22Config:
    """``VAE22Config`` from a Diffusers ``vae/config.json`` dict with ``is_residual``; missing fields take
    Diffusers' defaults (latent mean/std: the published values for the z_dim). ``clip_output`` (older
    Diffusers) is ignored: decode always clamps to [-1, 1], as the official code does."""
    if not is_wan22_diffusers_config(d):
        raise ConfigError(
            "not a Wan2.2 VAE config (an AutoencoderKLWan with is_residual): "
            f"_class_name={d.get('_class_name')!r}, is_residual={d.get('is_residual')!r}"
        )
    if d.get("attn_scales"):
        raise ConfigError("attention in the down/up stages (attn_scales) is not supported")
    base = int(d.get("base_dim", 96))
    p = int(d.get("patch_size") or 1)
    z_dim = int(d.get("z_dim", 16))
    mean, std = _latent_stats(z_dim)
    cfg = VAE22Config(
        dim=base,
        dec_dim=int(d.get("decoder_base_dim") or base),
        z_dim=z_dim,
        dim_mult=tuple(int(m) for m in d.get("dim_mult", (1, 2, 4, 4))),
        num_res_blocks=int(d.get("num_res_blocks", 2)),
        temporal_downsample=tuple(bool(t) for t in d.get("temperal_downsample", (False, True, True))),  # sic
        patch_size=p,
        latents_mean=tuple(float(v) for v in d.get("latents_mean", mean)),
        latents_std=tuple(float(v) for v in d.get("latents_std", std)),
    )
    checks = {  # field: (value when absent, value the architecture implies)
        "in_channels": (3, 3 * p * p),
        "out_channels": (3, 3 * p * p),
        "scale_factor_temporal": (None, cfg.temporal_stride),
        "scale_factor_spatial": (None, cfg.spatial_stride),
    }
    bad = {k: d[k] for k, (default, want) in checks.items() if d.get(k, default) not in (None, want)}
    if bad:
        raise ConfigError(f"AutoencoderKLWan settings {bad} disagree with patch_size {p} and the strides")
    return cfg


def wan22_vae_state_dict(cfg: VAE22Config, seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 weights with official keys (for tiny test checkpoints): default init, then norm gains
    jittered around 1 and biases around 0, as ``wanfast.testing`` does for the other components."""
    torch.manual_seed(seed)
    vae = Wan22VAE(cfg).float()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
