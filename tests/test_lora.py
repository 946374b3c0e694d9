"""LoRA files in the three key styles: reading, exact merge, separate mode, errors, pipeline wiring."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from wanfast.api import load_pipeline
from wanfast.config import ConfigError, EngineSettings
from wanfast.loading.checkpoint import CheckpointError
from wanfast.loading.lora import (
    LoRALinear,
    apply_lora,
    check_lora_settings,
    merge_lora_,
    read_lora,
    set_lora_enabled,
)
from wanfast.models.dit import WanDiT
from wanfast.presets import SAMPLING_PRESETS, sampling_overrides
from wanfast.specs import SPECS, resolve_params
from wanfast.tools.testing import write_official_checkpoint

CFG = SPECS["tiny"].dit
RANK = 4
# (official module, Diffusers module) pairs covered by the test files: attention, FFN and top-level Linears
TARGETS = [
    ("blocks.0.self_attn.q", "blocks.0.attn1.to_q"),
    ("blocks.0.self_attn.o", "blocks.0.attn1.to_out.0"),
    ("blocks.1.cross_attn.k", "blocks.1.attn2.to_k"),
    ("blocks.1.ffn.0", "blocks.1.ffn.net.0.proj"),
    ("blocks.0.ffn.2", "blocks.0.ffn.net.2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.head", "proj_out"),
]


def _dit(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(CFG).float()


def _pairs(dit: torch.nn.Module, seed: int, dim_scale: int = 1) -> dict[str, tuple]:
    """Random (A, B, alpha) per target, shaped for ``dit`` (x dim_scale: a model of another size)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, _) in enumerate(TARGETS):
        out_f, in_f = dit.get_submodule(name).weight.shape
        # small, as trained LoRAs are: the update stays near W's scale, so fp32 rounding stays < 1e-6
        a = 0.1 * torch.randn(RANK, in_f * dim_scale, generator=g)
        b = 0.1 * torch.randn(out_f * dim_scale, RANK, generator=g)
        out[name] = (a, b, float(2 + i))  # distinct alphas so a mix-up would show
    return out


def _write(path, pairs: dict[str, tuple], style: str) -> str:
    """A LoRA file in ``style``: "diffusers" (transformer.<diffusers>.lora_A), "official"
    (diffusion_model.<official>.lora_A), "kohya" (lora_unet_<official_underscored>.lora_down + alpha)."""
    to_diff = dict(TARGETS)
    sd = {}
    for name, (a, b, alpha) in pairs.items():
        if style == "kohya":
            stem = "lora_unet_" + name.replace(".", "_")
            sd |= {f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b}
        else:
            stem = f"transformer.{to_diff[name]}" if style == "diffusers" else f"diffusion_model.{name}"
            sd |= {f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b}
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return str(path)


def _expected(dit, pairs, strength):
    return {
        n: dit.get_submodule(n).weight.detach() + strength * (b @ a) * (alpha / a.shape[0])
        for n, (a, b, alpha) in pairs.items()
    }


@pytest.mark.parametrize("style", ["diffusers", "official", "kohya"])
def test_merge_equals_formula(tmp_path, style):
    dit = _dit()
    pairs = _pairs(dit, seed=1)
    before = copy.deepcopy(dit.state_dict())
    expected = _expected(dit, pairs, 0.7)
    lora = read_lora(_write(tmp_path / "l.safetensors", pairs, style), dit)
    assert set(lora.pairs) == set(pairs)
    assert merge_lora_(dit, lora, strength=0.7) == len(pairs)
    for name, w in expected.items():
        torch.testing.assert_close(dit.get_submodule(name).weight, w, atol=1e-6, rtol=0)
    untouched = [k for k in before if k.rpartition(".")[0] not in pairs]
    assert untouched and all(torch.equal(dit.state_dict()[k], before[k]) for k in untouched)


def test_no_alpha_means_scale_one_and_kohya_diffusers_names(tmp_path):
    dit = _dit()
    a, b = torch.randn(RANK, CFG.dim), torch.randn(CFG.dim, RANK)
    save_file(
        {
            "lora_unet_blocks_1_attn2_to_v.lora_down.weight": a,
            "lora_unet_blocks_1_attn2_to_v.lora_up.weight": b,
        },
        str(tmp_path / "k.safetensors"),
    )
    w = dit.blocks[1].cross_attn.v.weight.detach() + b @ a
    apply_lora(dit, tmp_path / "k.safetensors", strength=1.0)
    torch.testing.assert_close(dit.blocks[1].cross_attn.v.weight, w, atol=1e-6, rtol=0)


def test_strength_zero_leaves_weights(tmp_path):
    dit = _dit()
    before = copy.deepcopy(dit.state_dict())
    apply_lora(dit, _write(tmp_path / "l.safetensors", _pairs(dit, 2), "official"), strength=0.0)
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())


def test_wrong_shape_names_the_key(tmp_path):
    dit = _dit()
    path = _write(tmp_path / "big.safetensors", _pairs(dit, 3, dim_scale=2), "official")
    with pytest.raises(
        CheckpointError, match=r"LoRA key 'diffusion_model\.blocks\.\d\.\w+\.\w\.lora_A\.weight'.*fit"
    ):
        read_lora(path, dit)


@pytest.mark.parametrize(
    "key",
    [
        "diffusion_model.blocks.0.self_attn.qkv.lora_A.weight",  # not a Wan module
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",  # an SD-UNet LoRA
        "diffusion_model.blocks.0.self_attn.q.weight",  # a full weight, not a LoRA entry
    ],
)
def test_unknown_key_is_named(tmp_path, key):
    save_file({key: torch.zeros(2, 2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match=f"unknown LoRA key '{key}'"):
        read_lora(tmp_path / "x.safetensors")


def test_missing_block_and_half_pair(tmp_path):
    dit = _dit()
    a, b = torch.zeros(RANK, CFG.dim), torch.zeros(CFG.dim, RANK)
    key = f"diffusion_model.blocks.{CFG.num_layers}.self_attn.q"
    save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(tmp_path / "deep.safetensors"))
    with pytest.raises(CheckpointError, match="lacks"):
        read_lora(tmp_path / "deep.safetensors", dit)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": a}, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match="lacks its B"):
        read_lora(tmp_path / "half.safetensors")


def _forward(dit):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, CFG.in_dim, 1, 4, 4, generator=g)
    ctx = torch.randn(1, 3, CFG.text_dim, generator=g)
    with torch.no_grad():
        return dit(x, torch.tensor([700.0]), ctx)


def test_separate_mode_switches(tmp_path):
    path = _write(tmp_path / "l.safetensors", _pairs(_dit(), 4), "diffusers")
    base, merged, sep = _dit(), apply_lora(_dit(), path, 0.5), apply_lora(_dit(), path, 0.5, merge=False)
    assert isinstance(sep.blocks[0].self_attn.q, LoRALinear)
    ref_base, ref_merged = _forward(base), _forward(merged)
    assert not torch.allclose(ref_base, ref_merged, atol=1e-4)  # the LoRA changes the output
    torch.testing.assert_close(_forward(sep), ref_merged, atol=0, rtol=0)  # same fp32 arithmetic
    assert set_lora_enabled(sep, False) == len(TARGETS)
    torch.testing.assert_close(_forward(sep), ref_base, atol=0, rtol=0)
    set_lora_enabled(sep, True)
    torch.testing.assert_close(_forward(sep), ref_merged, atol=0, rtol=0)


def test_separate_mode_refuses_fusion_and_compile():
    s = EngineSettings(device="cpu", lora_low_noise="x.safetensors", lora_merge=False)
    with pytest.raises(ConfigError, match="fuse_projections"):
        check_lora_settings(s)
    with pytest.raises(ConfigError, match="compile"):
        check_lora_settings(
            EngineSettings(device="cuda", lora_low_noise="x", lora_merge=False, fuse_projections=False)
        )  # compile None: on for CUDA
    check_lora_settings(s.plain())  # plain eager: fine
    check_lora_settings(EngineSettings(device="cpu", lora_low_noise="x"))  # merged: anything goes


def test_load_pipeline_applies_each_file_to_its_expert(tmp_path):
    ckpt = write_official_checkpoint(tmp_path / "ckpt", SPECS["tiny"])
    base = load_pipeline(
        ckpt, settings=EngineSettings(device="cpu", dtype=torch.float32, vae_dtype=torch.float32).plain()
    )
    files, expected = {}, {}
    for i, expert in enumerate(("high_noise", "low_noise")):
        pairs = _pairs(base.experts[expert], seed=10 + i)
        files[expert] = _write(tmp_path / f"{expert}.safetensors", pairs, ("kohya", "official")[i])
        expected[expert] = _expected(base.experts[expert], pairs, 0.8)
    settings = EngineSettings(
        device="cpu",
        dtype=torch.float32,
        vae_dtype=torch.float32,
        lora_high_noise=files["high_noise"],
        lora_low_noise=files["low_noise"],
        lora_strength=0.8,
    ).plain()  # unfused, so the per-module weights can be compared by name
    pipe = load_pipeline(ckpt, settings=settings)
    for expert, weights in expected.items():
        for name, w in weights.items():
            torch.testing.assert_close(pipe.experts[expert].get_submodule(name).weight, w, atol=1e-6, rtol=0)
    # the high-noise file at the low-noise expert would not match: the experts got different updates
    assert not torch.allclose(
        pipe.experts["high_noise"].head.head.weight - base.experts["high_noise"].head.head.weight,
        pipe.experts["low_noise"].head.head.weight - base.experts["low_noise"].head.head.weight,
    )


def test_lightning_preset_overrides():
    over = sampling_overrides("lightning-4step")
    p = resolve_params(SPECS["t2v-A14B"], "a cat", **over)
    assert (p.steps, p.guidance_high_noise, p.guidance_low_noise, p.solver, p.shift, p.boundary) == (
        4,
        1.0,
        1.0,
        "euler",
        5.0,
        0.875,
    )
    assert SAMPLING_PRESETS["lightning-4step"]["text"].steps == 4  # per conditioning: the T2V LoRAs
    assert sampling_overrides("lightning-4step", SPECS["t2v-A14B"]) == over  # the default model is T2V-A14B
    assert resolve_params(SPECS["t2v-A14B"], "a cat", sampling_preset="lightning-4step") == p
    with pytest.raises(ConfigError, match="unknown sampling preset"):
        sampling_overrides("nope")
    # I2V-A14B: the Lightning I2V LoRAs' values (boundary 0.900, as the base I2V model)
    i2v = sampling_overrides("lightning-4step", SPECS["i2v-A14B"])
    assert i2v == {**over, "boundary": 0.900}
    with pytest.raises(ConfigError, match="is not for"):  # no Lightning LoRAs for the one-DiT TI2V-5B
        sampling_overrides("lightning-4step", SPECS["ti2v-5B"])
