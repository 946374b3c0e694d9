"""WanDiT against the Diffusers WanTransformer3DModel, key maps and config.json round trips (tiny dims)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from wanfast.config import ConfigError, DiTConfig
from wanfast.loading import dit_keys
from wanfast.models.dit import WanDiT, rope_freqs
from wanfast.specs import SPECS

CFG = SPECS["tiny"].dit  # dim 64, 4 heads, 2 layers, text_dim 32, text_len 32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_model(cfg: DiTConfig = CFG, seed: int = 0) -> WanDiT:
    """Random weights everywhere, norm weights and biases too, so no parameter is trivially 0 or 1."""
    torch.manual_seed(seed)
    model = WanDiT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name.endswith("modulation"):
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def models():
    WanTransformer3DModel = pytest.importorskip("diffusers").WanTransformer3DModel  # the oracle

    ours = random_model()
    ref = WanTransformer3DModel.from_config(dit_keys.diffusers_config_json(CFG)).eval()
    ref.load_state_dict(dit_keys.official_to_diffusers(ours.state_dict()), strict=True)
    return ours, ref


# (x shape [B, C, F, H, W], timesteps, context length)
CASES = [
    ((1, 16, 1, 4, 4), [937.0], 7),
    ((1, 16, 3, 6, 4), [500.0], 32),  # F > 1, non-square, context already at text_len
    ((2, 16, 2, 4, 8), [937.0, 13.0], 11),  # batch of 2 with different t
]


@pytest.mark.parametrize("shape,ts,ctx_len", CASES)
def test_matches_diffusers(models, shape, ts, ctx_len):
    ours, ref = models
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    t = torch.tensor(ts)
    ctx = torch.randn(shape[0], ctx_len, CFG.text_dim, generator=g)
    # Diffusers does not pad the text itself; its pipeline zero-pads to max_sequence_length.
    ctx_padded = torch.cat([ctx, ctx.new_zeros(shape[0], CFG.text_len - ctx_len, CFG.text_dim)], dim=1)
    with torch.no_grad():
        out = ours(x, t, ctx)
        expected = ref(x, t, ctx_padded, return_dict=False)[0]
    assert out.shape == x.shape and out.dtype == torch.float32
    assert rel_err(out, expected) <= 1e-5
    # The output really depends on the inputs (a constant or zero model would pass the check above).
    assert out.std() > 0.1 and out[0].sub(ours(x, t + 100, ctx)[0]).abs().max() > 1e-3


def test_padded_tokens_are_attended(models):
    """Official t2v attends to the zero-padded text rows (no context mask): with a shorter text_len
    (fewer padded rows) the same prompt gives a different output."""
    ours, _ = models
    x, ctx = torch.randn(1, 16, 1, 4, 4), torch.randn(1, 5, CFG.text_dim)
    t = torch.tensor([400.0])
    with torch.no_grad():
        base = ours(x, t, ctx)
        short = copy.deepcopy(ours)
        short.cfg = replace(CFG, text_len=8)
        assert rel_err(short(x, t, ctx), base) > 1e-3


def test_list_context_equals_padded_tensor(models):
    ours, _ = models
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 2, 4, 4, generator=g)
    t = torch.tensor([900, 250])  # integer timesteps are accepted
    rows = [torch.randn(5, CFG.text_dim, generator=g), torch.randn(12, CFG.text_dim, generator=g)]
    padded = torch.stack([torch.cat([r, r.new_zeros(CFG.text_len - len(r), CFG.text_dim)]) for r in rows])
    with torch.no_grad():
        a = ours(x, t, rows)
        b = ours(x, t.float(), padded)
        per_sample = torch.cat([ours(x[i : i + 1], t[i : i + 1], [rows[i]]) for i in range(2)])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, per_sample, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        ours(x, t, torch.randn(2, CFG.text_len + 1, CFG.text_dim))


@pytest.mark.parametrize("keep_modulation_fp32", [False, True])
def test_bf16_close_to_fp32(models, keep_modulation_fp32):
    ours, _ = models
    low = copy.deepcopy(ours).to(torch.bfloat16)
    if keep_modulation_fp32:  # as the loader does
        for name, p in low.named_parameters():
            if name.endswith("modulation"):
                p.data = p.data.float()
    assert low.dtype == torch.bfloat16
    x, ctx = torch.randn(1, 16, 3, 4, 6), torch.randn(1, 9, CFG.text_dim)
    t = torch.tensor([700.0])
    with torch.no_grad():
        out, expected = low(x, t, ctx), ours(x, t, ctx)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, expected) <= 2e-2


def test_rope_table():
    cfg = CFG  # head_dim 16: axes (t, h, w) get 8, 4, 4 dims -> 4, 2, 2 rotation pairs
    cos, sin = rope_freqs(cfg, (2, 3, 5))
    assert cos.shape == sin.shape == (30, 8) and cos.dtype == torch.float32
    angles = torch.atan2(sin, cos).double()
    # token (f=1, h=2, w=4) is index 1*15 + 2*5 + 4 = 29; pair 0 of each axis has frequency 1
    assert angles[29, 0].item() == pytest.approx(1.0)
    assert angles[29, 4].item() == pytest.approx(2.0)
    assert angles[29, 6].item() == pytest.approx(4.0 - 2 * torch.pi)
    # second pair of the t axis: theta^(-2/8)
    assert angles[29, 1].item() == pytest.approx(10000.0 ** (-0.25))


# ---------------------------------------------------------------- key maps


def test_key_map_round_trip_and_coverage():
    WanTransformer3DModel = pytest.importorskip("diffusers").WanTransformer3DModel  # the oracle

    sd = random_model().state_dict()
    diff = dit_keys.official_to_diffusers(sd)
    ref_keys = set(WanTransformer3DModel.from_config(dit_keys.diffusers_config_json(CFG)).state_dict())
    assert set(diff) == ref_keys  # every Diffusers key is produced, nothing else
    back = dit_keys.diffusers_to_official(diff)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)
    # spot checks of the renames that are easy to get wrong
    assert diff["blocks.1.norm2.weight"] is sd["blocks.1.norm3.weight"]
    assert diff["blocks.0.scale_shift_table"] is sd["blocks.0.modulation"]
    assert diff["scale_shift_table"] is sd["head.modulation"]
    assert diff["blocks.1.attn2.to_out.0.bias"] is sd["blocks.1.cross_attn.o.bias"]
    assert diff["condition_embedder.time_proj.weight"] is sd["time_projection.1.weight"]


def test_official_key_list():
    """The parameter names of the official WanModel (wan/modules/model.py) for one block and the rest."""
    keys = set(WanDiT(CFG).state_dict())
    block = {
        f"blocks.1.{m}.{p}"
        for m in "self_attn.q self_attn.k self_attn.v self_attn.o norm3 cross_attn.q cross_attn.k cross_attn.v "
        "cross_attn.o ffn.0 ffn.2".split()
        for p in ("weight", "bias")
    } | {f"blocks.1.{a}.norm_{x}.weight" for a in ("self_attn", "cross_attn") for x in "qk"}
    block.add("blocks.1.modulation")
    top = {
        f"{m}.{p}"
        for m in "patch_embedding text_embedding.0 text_embedding.2 time_embedding.0 time_embedding.2 "
        "time_projection.1 head.head".split()
        for p in ("weight", "bias")
    } | {"head.modulation"}
    assert block <= keys and top <= keys
    assert len(keys) == len(top) + CFG.num_layers * len(block)
    assert sum(p.numel() for p in WanDiT(CFG).parameters()) == CFG.num_params()


def test_unknown_keys_raise():
    with pytest.raises(KeyError, match="blocks.0.norm1.weight"):
        dit_keys.official_to_diffusers({"blocks.0.norm1.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="img_emb.proj.0.weight"):
        dit_keys.official_to_diffusers({"img_emb.proj.0.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="condition_embedder.image_embedder.norm1.weight"):
        dit_keys.diffusers_to_official({"condition_embedder.image_embedder.norm1.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="blocks.0.self_attn.q.weight"):
        dit_keys.diffusers_to_official({"blocks.0.self_attn.q.weight": torch.zeros(1)})  # official key


# ---------------------------------------------------------------- config.json


VARIANTS = [
    CFG,
    SPECS["t2v-A14B"].dit,
    replace(CFG, dim=96, ffn_dim=80, num_heads=8, num_layers=3, freq_dim=16, text_len=20, text_dim=24),
    replace(CFG, in_dim=8, out_dim=12, patch_size=(2, 2, 1), eps=1e-5, cross_attn_norm=False),
]


def write_header_only_dit(folder, cfg: DiTConfig) -> None:
    """An official expert folder as the loaders see it before reading weights: its config.json and a
    safetensors file whose header holds ``text_embedding.0.weight`` [dim, text_dim] (bf16 zeros, written
    sparse: the A14B table would be 40 MiB)."""
    import json
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dit_keys.official_config_json(cfg)))
    nbytes = cfg.dim * cfg.text_dim * 2
    entry = {"dtype": "BF16", "shape": [cfg.dim, cfg.text_dim], "data_offsets": [0, nbytes]}
    header = json.dumps({"text_embedding.0.weight": entry}).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header to 8 bytes
    with open(folder / "diffusion_pytorch_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + nbytes)


@pytest.mark.parametrize("cfg", VARIANTS)
def test_config_round_trips(cfg, tmp_path):
    from wanfast.loading.layout import dit_config

    # The official config.json records no text width (as the published files): the JSON alone gives
    # every other field back, and the WanModel default (4096) for the text width ...
    from_json = dit_keys.config_from_official_json(dit_keys.official_config_json(cfg))
    assert "text_dim" not in dit_keys.official_config_json(cfg)
    assert replace(from_json, text_dim=cfg.text_dim) == cfg and from_json.text_dim == 4096
    # ... and the loaders' reader takes it from text_embedding.0.weight's shape: the whole config back
    write_header_only_dit(tmp_path / "dit", cfg)
    assert dit_config(tmp_path / "dit") == (cfg, "official")
    assert dit_keys.config_from_diffusers_json(dit_keys.diffusers_config_json(cfg)) == cfg


def test_config_files_look_real():
    big = SPECS["t2v-A14B"].dit
    official = dit_keys.official_config_json(big)
    assert official["_class_name"] == "WanModel" and official["model_type"] == "t2v"
    # the published high_noise_model/config.json records neither text_dim nor patch_size nor the norms
    assert set(official) == {"_class_name", "_diffusers_version", "dim", "eps", "ffn_dim", "freq_dim",
                             "in_dim", "model_type", "num_heads", "num_layers", "out_dim", "text_len"}  # fmt: skip
    diff = dit_keys.diffusers_config_json(big)
    assert diff["_class_name"] == "WanTransformer3DModel" and "text_len" not in diff
    assert (diff["num_attention_heads"], diff["attention_head_dim"], diff["text_dim"]) == (40, 128, 4096)
    # unknown keys are ignored; the text length of a Diffusers transformer defaults to the pipeline's 512
    assert dit_keys.config_from_official_json({**official, "window_size": [-1, -1], "foo": 1}) == big
    assert dit_keys.config_from_diffusers_json({**diff, "foo": 1}) == big
    assert (
        dit_keys.config_from_diffusers_json(dit_keys.diffusers_config_json(CFG), text_len=512).text_len == 512
    )


def test_config_errors():
    with pytest.raises(ConfigError, match="model_type"):  # Wan2.2-S2V: not a supported family
        dit_keys.config_from_official_json({**dit_keys.official_config_json(CFG), "model_type": "s2v"})
    for supported in ("t2v", "ti2v", "i2v"):  # the three families the specs cover
        assert dit_keys.config_from_official_json(dit_keys.official_config_json(CFG, supported)) == replace(
            CFG, text_dim=4096
        )
    with pytest.raises(ConfigError, match="num_heads"):
        dit_keys.config_from_official_json({"dim": 64, "ffn_dim": 128, "num_layers": 2})
    with pytest.raises(ConfigError, match="I2V"):
        dit_keys.config_from_diffusers_json({**dit_keys.diffusers_config_json(CFG), "image_dim": 1280})
    with pytest.raises(ConfigError, match="qk_norm"):
        dit_keys.config_from_diffusers_json({**dit_keys.diffusers_config_json(CFG), "qk_norm": "rms_norm"})
