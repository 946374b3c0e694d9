"""WanVAE against Diffusers' AutoencoderKLWan (same random weights through the key map), the key map itself,
and the configs read from checkpoints. Tiny fp32 models on CPU."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from helpers import randomize, rel_err

from wanfast.config import ConfigError, VAEConfig
from wanfast.loading import vae_keys
from wanfast.models.vae import WanVAE
from wanfast.specs import SPECS

diffusers = pytest.importorskip("diffusers")
AutoencoderKLWan = diffusers.AutoencoderKLWan

# Default dim_mult / temporal_downsample: every layer type runs (shortcut convs, attention in the middle
# blocks, downsample2d/3d, upsample3d/2d).
CFG = VAEConfig(dim=8, num_res_blocks=1)


def diffusers_vae(cfg: VAEConfig) -> AutoencoderKLWan:
    kwargs = vae_keys.diffusers_config_json(cfg)
    assert kwargs.pop("_class_name") == "AutoencoderKLWan"
    return AutoencoderKLWan(**kwargs).eval()


def ids(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k: id(v) for k, v in sd.items()}


def scale(cfg: VAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    return mean, std


@pytest.fixture(scope="module")
def pair() -> tuple[WanVAE, AutoencoderKLWan]:
    torch.manual_seed(0)
    ours = randomize(WanVAE(CFG))
    ref = diffusers_vae(CFG)
    ref.load_state_dict(vae_keys.official_to_diffusers(ours.state_dict()), strict=True)
    return ours, ref


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    ours, ref = pair
    x = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1  # frame 0 + 2 chunks
    got = ours.encode(x)
    mean, std = scale(CFG)
    want = (ref.encode(x).latent_dist.mode() - mean) / std
    assert got.shape == (1, 16, 3, 4, 6) and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-4
    # Causal: the first frame alone (and the first 5 frames) give the same leading latents.
    assert rel_err(ours.encode(x[:, :, :1]), got[:, :, :1]) <= 1e-5
    assert rel_err(ours.encode(x[:, :, :5]), got[:, :, :2]) <= 1e-5


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    ours, ref = pair
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(2))
    got = ours.decode(z)
    mean, std = scale(CFG)
    want = ref.decode(z * std + mean).sample  # Diffusers clamps to [-1, 1] too
    assert got.shape == (1, 3, 9, 32, 48) and got.dtype == torch.float32
    assert got.abs().max() <= 1.0 and (got.abs() < 0.99).float().mean() > 0.9  # mostly not clamped
    assert rel_err(got, want) <= 1e-4
    assert rel_err(ours.decode(z[:, :, :1]), got[:, :, :1]) <= 1e-5  # latent frame 0 -> video frame 0


@torch.no_grad()
def test_bf16_decode_close_to_fp32(pair):
    ours, _ = pair
    z = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(3))
    want = ours.decode(z)
    low = copy.deepcopy(ours).to(torch.bfloat16)
    got = low.decode(z)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    # bf16 keeps ~3 significant digits per op; ~40 layers of random weights stay within a few percent.
    err = rel_err(got, want)
    assert 1e-5 < err <= 5e-2, err  # > 0: the computation really ran in bf16


def test_bad_shapes_raise(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="4n\\+1"):
        ours.encode(torch.zeros(1, 3, 4, 32, 48))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(torch.zeros(1, 3, 5, 30, 48))
    with pytest.raises(ValueError, match="latents"):
        ours.decode(torch.zeros(1, 8, 2, 4, 6))


@pytest.mark.parametrize("nrb", [1, 2])
def test_key_map_round_trip_and_coverage(nrb):
    cfg = VAEConfig(dim=8, num_res_blocks=nrb)
    with torch.device("meta"):
        ours, ref = WanVAE(cfg), diffusers_vae(cfg)
    official, diff = ours.state_dict(), ref.state_dict()
    assert set(vae_keys.official_to_diffusers(official)) == set(diff)
    assert set(vae_keys.diffusers_to_official(diff)) == set(official)
    # Round trips give back each key with its own tensor.
    assert ids(vae_keys.diffusers_to_official(vae_keys.official_to_diffusers(official))) == ids(official)
    assert ids(vae_keys.official_to_diffusers(vae_keys.diffusers_to_official(diff))) == ids(diff)
    # A few pairs spelled out (the upsampler of up block 0 sits after its nrb + 1 resnets).
    fwd = dict(zip(official, vae_keys.official_to_diffusers(official), strict=True))
    up = "decoder.upsamples"
    assert fwd["conv1.weight"] == "quant_conv.weight"
    assert fwd["encoder.middle.1.to_qkv.weight"] == "encoder.mid_block.attentions.0.to_qkv.weight"
    assert fwd[f"{up}.{nrb + 1}.time_conv.weight"] == "decoder.up_blocks.0.upsamplers.0.time_conv.weight"
    assert fwd[f"{up}.{nrb + 2}.residual.6.bias"] == "decoder.up_blocks.1.resnets.0.conv2.bias"
    assert fwd[f"{up}.{nrb + 2}.shortcut.weight"] == "decoder.up_blocks.1.resnets.0.conv_shortcut.weight"


def test_unknown_key_raises():
    with torch.device("meta"):
        official = WanVAE(CFG).state_dict()
        diff = diffusers_vae(CFG).state_dict()
    t = torch.zeros(1)
    for bad in ("encoder.downsamples.0.residual.9.weight", "decoder.foo.weight", "quant_conv.weight"):
        with pytest.raises(KeyError, match=bad.replace(".", r"\.")):
            vae_keys.official_to_diffusers({**official, bad: t})
    for bad in (
        "decoder.up_blocks.0.resnets.7.norm1.gamma",
        "decoder.up_blocks.1.conv1.bias",
        "conv1.weight",
    ):
        with pytest.raises(KeyError, match=bad.replace(".", r"\.")):
            vae_keys.diffusers_to_official({**diff, bad: t})


@pytest.mark.parametrize(
    "cfg",
    [
        VAEConfig(),  # the real Wan2.1 VAE
        SPECS["tiny"].vae,
        VAEConfig(dim=4, dim_mult=(1, 2, 2), num_res_blocks=3, temporal_downsample=(True, False)),
        VAEConfig(dim=6, dim_mult=(1, 3, 2, 2, 1), temporal_downsample=(False, False, True, False)),
    ],
)
def test_config_from_state_dict(cfg):
    with torch.device("meta"):
        sd = WanVAE(cfg).state_dict()
    assert vae_keys.config_from_state_dict(sd) == cfg
    assert vae_keys.config_from_diffusers_json(vae_keys.diffusers_config_json(cfg)) == cfg


def test_config_errors():
    with torch.device("meta"):
        sd = WanVAE(CFG).state_dict()
    with pytest.raises(ConfigError, match="encoder.conv1.weight"):
        vae_keys.config_from_state_dict({k: v for k, v in sd.items() if k != "encoder.conv1.weight"})
    attn_first = {k: v for k, v in sd.items() if not k.startswith("encoder.downsamples.0.")}
    attn_first["encoder.downsamples.0.norm.gamma"] = torch.zeros(8, 1, 1)  # attention in the down path
    with pytest.raises(ConfigError, match="neither"):
        vae_keys.config_from_state_dict(attn_first)
    with pytest.raises(ConfigError, match="is_residual"):  # the Wan2.2 VAE
        vae_keys.config_from_diffusers_json({**vae_keys.diffusers_config_json(CFG), "is_residual": True})


def test_latent_stats_match_diffusers_defaults():
    # Diffusers' AutoencoderKLWan defaults are the Wan2.1 VAE; so are VAEConfig's (and the official Wan2_1_VAE).
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLWan.__init__).parameters.items()}
    assert tuple(defaults["latents_mean"]) == VAEConfig().latents_mean
    assert tuple(defaults["latents_std"]) == VAEConfig().latents_std
    assert vae_keys.config_from_diffusers_json({"_class_name": "AutoencoderKLWan", **defaults}) == VAEConfig()
