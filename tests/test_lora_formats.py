"""LoRA files in every published key layout, stacks with per-expert strengths, and the float32 merge.

Each synthetic file is written from known (A, B, alpha) or full deltas; the test computes the update its
trainer's loader would apply (the formula written out here, independent of ``wanfast.loading``), adds it
by hand to a LoRA-free tiny pipeline, and compares final latents with the pipeline that loaded the file.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from wanfast.api import load_pipeline, tiny_pipeline
from wanfast.builder import plan
from wanfast.config import ConfigError, EngineSettings, LoraSpec
from wanfast.flags import add_engine_flags, engine_settings
from wanfast.loading.checkpoint import CheckpointError
from wanfast.loading.lora import check_lora_files, read_lora
from wanfast.specs import SPECS
from wanfast.tools.testing import write_diffusers_checkpoint, write_official_checkpoint

RANK = 4
# (official module, Diffusers module) pairs: self/cross attention, FFN and the float32 time MLP
PAIRS = [
    ("blocks.0.self_attn.q", "blocks.0.attn1.to_q"),
    ("blocks.1.self_attn.v", "blocks.1.attn1.to_v"),
    ("blocks.1.cross_attn.o", "blocks.1.attn2.to_out.0"),
    ("blocks.0.ffn.0", "blocks.0.ffn.net.0.proj"),
    ("time_projection.1", "condition_embedder.time_proj"),
]
# LightX2V extractor full deltas: (file key without prefix, official parameter)
DIFFS = [
    ("head.head.diff", "head.head.weight"),
    ("patch_embedding.diff", "patch_embedding.weight"),
    ("patch_embedding.diff_b", "patch_embedding.bias"),
    ("blocks.0.norm3.diff", "blocks.0.norm3.weight"),
    ("blocks.1.norm3.diff_b", "blocks.1.norm3.bias"),
    ("blocks.1.self_attn.norm_q.diff", "blocks.1.self_attn.norm_q.weight"),
    ("blocks.0.cross_attn.k.diff_b", "blocks.0.cross_attn.k.bias"),
    ("blocks.1.diff_m", "blocks.1.modulation"),
    ("head.diff_m", "head.modulation"),
]
LAYOUTS = [
    "peft-metadata",
    "peft-adapter-config",
    "kohya-tensor-alpha",
    "official-no-alpha",
    "videox-fun",
    "diffsynth",
    "lightx2v",
]
GEN = dict(steps=4, seed=3)


def _settings(**kw) -> EngineSettings:
    # plain: per-module weights (no q/k/v fusion), so the hand merge can address them by name
    return EngineSettings(device="cpu", dtype=torch.float32, vae_dtype=torch.float32, **kw).plain()


@pytest.fixture(scope="module")
def shapes() -> dict[str, tuple[int, ...]]:
    dit = tiny_pipeline(settings=_settings()).experts["high_noise"]
    return {k: tuple(p.shape) for k, p in dit.named_parameters()}


def _write(folder, layout: str, shapes, seed: int) -> tuple[str, dict[str, torch.Tensor]]:
    """A LoRA file in ``layout`` -> (path, {official parameter: the update at strength 1}), the update
    by each trainer's own rule (module docstring of wanfast.loading.lora_formats for the sources)."""
    g = torch.Generator().manual_seed(seed)
    sd, meta, expected = {}, None, {}
    folder.mkdir(parents=True, exist_ok=True)
    for i, (official, diffusers) in enumerate(PAIRS):
        out_f, in_f = shapes[f"{official}.weight"]
        a, b = 0.2 * torch.randn(RANK, in_f, generator=g), 0.2 * torch.randn(out_f, RANK, generator=g)
        alpha = float(1 + i)  # distinct per module, so a mix-up shows
        if layout == "peft-metadata":  # Diffusers save_lora_weights: alpha in the header, per component
            stem, scale = f"transformer.{diffusers}", (3.0 if "attn1.to_q" in diffusers else 1.0) / RANK
            sd |= {f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b}
        elif layout == "peft-adapter-config":  # PEFT save_pretrained, rsLoRA: lora_alpha / sqrt(r)
            stem, scale = f"base_model.model.{official}", 6.0 / RANK**0.5
            sd |= {f"{stem}.lora_A.weight": a, f"{stem}.lora_B.weight": b}
        elif layout in ("kohya-tensor-alpha", "videox-fun"):  # alpha / rank from the tensor
            name = diffusers if layout == "kohya-tensor-alpha" else official
            stem = ("lora_unet_" if layout == "kohya-tensor-alpha" else "lora_unet__") + name.replace(
                ".", "_"
            )
            sd |= {
                f"{stem}.lora_down.weight": a,
                f"{stem}.lora_up.weight": b,
                f"{stem}.alpha": torch.tensor(alpha),
            }
            scale = alpha / RANK
        elif layout == "diffsynth":  # PEFT adapter name kept, lora_alpha = rank: scale 1
            stem, scale = f"pipe.dit.{official}", 1.0
            sd |= {f"{stem}.lora_A.default.weight": a, f"{stem}.lora_B.default.weight": b}
        else:  # official names, no alpha (the LightX2V extractor's pairs too): scale 1
            stem, scale = f"diffusion_model.{official}", 1.0
            suffix = ("lora_down", "lora_up") if layout == "lightx2v" else ("lora_A", "lora_B")
            sd |= {f"{stem}.{suffix[0]}.weight": a, f"{stem}.{suffix[1]}.weight": b}
        expected[f"{official}.weight"] = scale * (b @ a)
    if layout == "lightx2v":
        for key, param in DIFFS:
            d = 0.05 * torch.randn(shapes[param], generator=g)
            sd[f"diffusion_model.{key}"], expected[param] = d, d.clone()
    if layout == "peft-metadata":  # as diffusers writes it: keys prefixed by component, a JSON string
        cfg = {
            "transformer.r": RANK,
            "transformer.lora_alpha": 1,
            "transformer.alpha_pattern": {"attn1.to_q": 3},
        }
        meta = {"format": "pt", "lora_adapter_metadata": json.dumps(cfg)}
    if layout == "peft-adapter-config":
        (folder / "adapter_config.json").write_text(
            json.dumps({"r": RANK, "lora_alpha": 6, "use_rslora": True})
        )
    if layout == "kohya-tensor-alpha":  # a config that the alpha tensors must override
        meta = {"lora_adapter_metadata": json.dumps({"r": RANK, "lora_alpha": 100})}
    path = folder / "lora.safetensors"
    save_file(sd, str(path), metadata=meta)
    return str(path), expected


def _hand_merged(stack: dict[str, list[tuple[dict, float]]]):
    """A LoRA-free tiny pipeline with ``W += strength * update`` added by hand per expert, in float32."""
    pipe = tiny_pipeline(settings=_settings())
    with torch.no_grad():
        for expert, items in stack.items():
            dit = pipe.experts[expert]
            for updates, strength in items:
                for param, d in updates.items():
                    dit.get_parameter(param).add_(strength * d)
    return pipe


def _close(got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> None:
    # The two pipelines differ only by float32 rounding of the merged weights (a few ulp per element, from
    # the order of scale * (B @ A) and of the sums), amplified by 4 steps of a 2-block DiT and the solver:
    # 1e-5 of the latents' range leaves room for that and is far below the LoRA's own effect (>1e-2).
    span = ref.abs().max()
    assert (ref - base).abs().max() > 1e-2 * span  # the LoRA changes the result: the check has teeth
    assert (got - ref).abs().max() <= 1e-5 * span


@pytest.fixture(scope="module")
def base_latents():
    return tiny_pipeline(settings=_settings()).generate("a red fox", **GEN).latents


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_merges_like_its_trainer(tmp_path, shapes, base_latents, layout):
    path, updates = _write(tmp_path / layout, layout, shapes, seed=LAYOUTS.index(layout))
    assert set(read_lora(path).targets()) == set(updates)
    got = tiny_pipeline(settings=_settings(loras=(LoraSpec(path, 0.8, 1.3),))).generate("a red fox", **GEN)
    ref = _hand_merged({"high_noise": [(updates, 0.8)], "low_noise": [(updates, 1.3)]})
    _close(got.latents, ref.generate("a red fox", **GEN).latents, base_latents)


def test_stack_of_two_with_per_expert_strengths(tmp_path, shapes, base_latents):
    p1, u1 = _write(tmp_path / "a", "lightx2v", shapes, seed=11)
    p2, u2 = _write(tmp_path / "b", "peft-metadata", shapes, seed=12)
    stack = (LoraSpec(p1, 3.0, 1.5), LoraSpec(p2, 0.0, -0.7))  # the second only on the low-noise expert
    got = tiny_pipeline(settings=_settings(loras=stack)).generate("a red fox", **GEN)
    ref = _hand_merged({"high_noise": [(u1, 3.0)], "low_noise": [(u1, 1.5), (u2, -0.7)]})
    _close(got.latents, ref.generate("a red fox", **GEN).latents, base_latents)


def test_strength_zero_is_bit_identical_to_none(tmp_path, shapes, base_latents):
    path, _ = _write(tmp_path, "lightx2v", shapes, seed=5)
    got = tiny_pipeline(settings=_settings(loras=(LoraSpec(path, 0.0, 0.0),))).generate("a red fox", **GEN)
    assert torch.equal(got.latents, base_latents)


def test_metadata_alpha_scale(tmp_path, shapes):
    """The issue's case: {"transformer.r": 16, "transformer.lora_alpha": 1} is 1/16, not 1."""
    a, b = torch.randn(16, 32), torch.randn(32, 16)
    key = "transformer.blocks.0.attn1.to_k"
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 16, "transformer.lora_alpha": 1})}
    save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(tmp_path / "m.safetensors"), meta)
    assert read_lora(tmp_path / "m.safetensors").pairs["blocks.0.self_attn.k"][2] == 1 / 16
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 8, "transformer.lora_alpha": 1})}
    save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(tmp_path / "x.safetensors"), meta)
    with pytest.raises(CheckpointError, match=r"rank 16, but the file's PEFT config says r=8"):
        read_lora(tmp_path / "x.safetensors")  # another adapter's config: refused, not a silent scale
    (tmp_path / "c").mkdir()  # the same file without metadata but with PEFT's adapter_config.json beside it
    save_file({f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, str(tmp_path / "c" / "m.safetensors"))
    assert read_lora(tmp_path / "c" / "m.safetensors").pairs["blocks.0.self_attn.k"][2] == 1.0
    (tmp_path / "c" / "adapter_config.json").write_text(json.dumps({"r": 16, "lora_alpha": 8}))
    assert read_lora(tmp_path / "c" / "m.safetensors").pairs["blocks.0.self_attn.k"][2] == 0.5


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_merge_in_float32_from_the_checkpoint_then_cast(tmp_path, shapes, layout):
    """An fp32 checkpoint run in bf16: W_bf16 = (W_fp32 + delta).to(bf16), exactly (the merge re-reads W
    from the checkpoint, through the Diffusers key map for that layout); modulation stays fp32."""
    write = write_official_checkpoint if layout == "official" else write_diffusers_checkpoint
    ckpt = write(tmp_path / "ckpt", SPECS["tiny"])
    path, updates = _write(tmp_path / "lora", "lightx2v", shapes, seed=7)
    s = EngineSettings(device="cpu", dtype=torch.bfloat16, vae_dtype=torch.float32).plain()
    fp32 = load_pipeline(ckpt, settings=_settings()).experts["low_noise"]
    dit = load_pipeline(ckpt, settings=replace(s, loras=(LoraSpec(path, 1.0, 2.0),))).experts["low_noise"]
    for param, d in updates.items():
        want = fp32.get_parameter(param).detach() + 2.0 * d
        got = dit.get_parameter(param)
        dtype = torch.float32 if param.endswith("modulation") else torch.bfloat16
        assert got.dtype == dtype and torch.equal(got, want.to(dtype)), param
    untouched = "blocks.0.self_attn.k.weight"
    assert torch.equal(dit.get_parameter(untouched), fp32.get_parameter(untouched).to(torch.bfloat16))


def test_one_dit_model_takes_the_high_noise_strength(tmp_path):
    dit = tiny_pipeline(settings=_settings(), model="tiny-ti2v").experts["dit"]
    path, updates = _write(
        tmp_path, "official-no-alpha", {k: tuple(p.shape) for k, p in dit.named_parameters()}, 9
    )
    merged = tiny_pipeline(settings=_settings(loras=(LoraSpec(path, 0.6, 5.0),)), model="tiny-ti2v")
    for param, d in updates.items():
        want = dit.get_parameter(param).detach() + 0.6 * d
        torch.testing.assert_close(merged.experts["dit"].get_parameter(param), want, atol=1e-6, rtol=0)


def test_one_dit_model_refuses_a_low_noise_only_lora(tmp_path):
    from wanfast.builder import plan

    dit = tiny_pipeline(settings=_settings(), model="tiny-ti2v").experts["dit"]
    path, _ = _write(tmp_path, "official-no-alpha", {k: tuple(p.shape) for k, p in dit.named_parameters()}, 9)
    for settings in (_settings(loras=(LoraSpec(path, 0.0, 1.5),)), _settings(lora_low_noise=path)):
        with pytest.raises(ConfigError, match="has only a low-noise one"):  # it would be dropped silently
            plan("tiny-ti2v", settings)


def test_other_model_kinds_are_named(tmp_path):
    t2v = SPECS["t2v-A14B"]
    # a TI2V-5B-shaped pair (dim 3072) on T2V-A14B (dim 5120)
    save_file(
        {
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(2, 3072),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(3072, 2),
        },
        str(tmp_path / "5b.safetensors"),
    )
    with pytest.raises(CheckpointError, match=r"self_attn\.q\.lora_down.*does not fit.*ti2v-5B"):
        check_lora_files([LoraSpec(str(tmp_path / "5b.safetensors"))], t2v)
    # an I2V-A14B patch embedding delta (36 input channels) on T2V-A14B (16)
    save_file(
        {"diffusion_model.patch_embedding.diff": torch.zeros(5120, 36, 1, 2, 2)},
        str(tmp_path / "i.safetensors"),
    )
    with pytest.raises(CheckpointError, match=r"patch_embedding\.diff'.*i2v-A14B"):
        check_lora_files([LoraSpec(str(tmp_path / "i.safetensors"))], t2v)
    # a block that TI2V-5B (30 blocks) lacks, but both A14B models (40) have
    save_file(
        {
            "diffusion_model.blocks.35.ffn.2.lora_down.weight": torch.zeros(2, 8),
            "diffusion_model.blocks.35.ffn.2.lora_up.weight": torch.zeros(8, 2),
        },
        str(tmp_path / "deep.safetensors"),
    )
    with pytest.raises(CheckpointError, match=r"blocks\.35\.ffn\.2'.*lacks.*t2v-A14B / i2v-A14B"):
        check_lora_files([LoraSpec(str(tmp_path / "deep.safetensors"))], SPECS["ti2v-5B"])
    # Wan2.1 I2V image cross-attention: no Wan2.2 model has it
    key = "diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight"
    save_file({key: torch.zeros(2, 8)}, str(tmp_path / "w21.safetensors"))
    with pytest.raises(CheckpointError, match=f"LoRA key '{key}'.*Wan2.1 I2V"):
        read_lora(tmp_path / "w21.safetensors")
    key = "diffusion_model.blocks.0.self_attn.qkv.diff_b"  # still an error naming the key
    save_file({key: torch.zeros(2)}, str(tmp_path / "u.safetensors"))
    with pytest.raises(CheckpointError, match=f"unknown LoRA key '{key}'"):
        read_lora(tmp_path / "u.safetensors")


def test_plan_checks_files_before_loading(tmp_path, shapes):
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        plan("tiny", _settings(loras=(LoraSpec(str(tmp_path / "missing.safetensors")),)))
    save_file({"diffusion_model.head.head.diff": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="does not fit"):
        plan("tiny", _settings(lora_low_noise=str(tmp_path / "bad.safetensors")))


def test_flags_and_json():
    import argparse

    p = argparse.ArgumentParser()
    add_engine_flags(p)
    args = p.parse_args(["--lora", "a.safetensors:3:1.5", "--lora", "c:/x/b.safetensors:2", "--lora", "c.st"])
    s = engine_settings(args)
    assert s.loras == (
        LoraSpec("a.safetensors", 3.0, 1.5),
        LoraSpec("c:/x/b.safetensors", 2.0, 2.0),
        LoraSpec("c.st"),
    )
    old = engine_settings(
        p.parse_args(["--lora-high-noise", "h", "--lora-low-noise", "l", "--lora-strength", "0.5"])
    )
    assert old.lora_stack() == (LoraSpec("h", 0.5, 0.0), LoraSpec("l", 0.0, 0.5))
    both = EngineSettings(loras=s.loras, lora_high_noise="h")
    assert both.lora_stack() == s.loras + (LoraSpec("h", 1.0, 0.0),)
    assert EngineSettings.from_json(json.loads(json.dumps(both.to_json()))) == both
    with pytest.raises(SystemExit):
        p.parse_args(["--lora", ":2"])


def test_peft_lora_bias_rank_pattern_and_unprefixed_diffsynth(tmp_path):
    """PEFT's lora_B bias (Diffusers' form of LightX2V's diff_b) is scaled like the branch; rank_pattern
    overrides r per module; DiffSynth keys may carry no prefix at all."""
    a, b, bias = torch.randn(2, 32), torch.randn(32, 2), torch.randn(32)
    q, k = "transformer.blocks.0.attn1.to_q", "transformer.blocks.1.attn1.to_k"
    cfg = {
        "transformer.r": 4,
        "transformer.lora_alpha": 8,
        "transformer.rank_pattern": {"blocks.1.attn1.to_k": 2},
    }
    sd = {f"{q}.lora_A.weight": torch.randn(4, 32), f"{q}.lora_B.weight": torch.randn(32, 4)}
    sd |= {f"{k}.lora_A.weight": a, f"{k}.lora_B.weight": b, f"{k}.lora_B.bias": bias}
    save_file(sd, str(tmp_path / "p.safetensors"), {"lora_adapter_metadata": json.dumps(cfg)})
    lora = read_lora(tmp_path / "p.safetensors")
    assert lora.pairs["blocks.0.self_attn.q"][2] == 2.0 and lora.pairs["blocks.1.self_attn.k"][2] == 4.0
    assert torch.equal(lora.diffs["blocks.1.self_attn.k.bias"], 4.0 * bias)
    stem = "blocks.0.ffn.2"
    save_file(
        {f"{stem}.lora_A.default.weight": a, f"{stem}.lora_B.default.weight": b}, str(tmp_path / "d.st")
    )
    assert read_lora(tmp_path / "d.st").pairs[stem][2] == 1.0


def test_separate_mode_refuses_full_deltas_in_plan(tmp_path, shapes):
    path, _ = _write(tmp_path, "lightx2v", shapes, seed=2)
    with pytest.raises(ConfigError, match=r"full deltas .*only merge"):
        plan("tiny", _settings(loras=(LoraSpec(path),), lora_merge=False))


def test_cli_lora_flag_reaches_the_build(tmp_path, shapes, capsys):
    from safetensors.torch import load_file

    from wanfast.cli import main

    path, _ = _write(tmp_path / "l", "kohya-tensor-alpha", shapes, seed=4)
    lat = tmp_path / "lat.safetensors"
    argv = ["generate", "--model", "tiny", "--prompt", "a red fox", "--steps", "4", "--seed", "3", "--plain",
            "--device", "cpu", "--dtype", "fp32", "--output", str(tmp_path / "o.mp4"), "--save-latents", str(lat),
            "--no-progress", "--lora", f"{path}:0.8:1.3"]  # fmt: skip
    assert main(argv) == 0
    want = tiny_pipeline(settings=_settings(loras=(LoraSpec(path, 0.8, 1.3),))).generate("a red fox", **GEN)
    assert torch.equal(load_file(lat)["latents"], want.latents)  # same build, same arithmetic
    capsys.readouterr()
    assert main([*argv[:-1], f"{tmp_path / 'missing.safetensors'}:2"]) == 2
    assert "LoRA file not found" in capsys.readouterr().err
