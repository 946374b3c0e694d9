"""Checkpoint layouts, strict loading and the errors a user sees for bad folders and files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from wanfast import CheckpointError, load_text_encoder, load_transformer, load_vae
from wanfast.loading.checkpoint import safetensors_files
from wanfast.loading.layout import detect
from wanfast.specs import SPECS


def detect_layout(folder):
    return detect(folder)[1]


def test_detect_layouts(tiny_official, tiny_diffusers):
    off, dif = detect_layout(tiny_official), detect_layout(tiny_diffusers)
    assert off.kind == "official" and off.experts["high_noise"].name == "high_noise_model"
    assert (
        dif.kind == "diffusers"
        and dif.experts["high_noise"].name == "transformer"
        and dif.experts["low_noise"].name == "transformer_2"
    )
    assert dif.boundary == SPECS["tiny"].defaults.boundary


def test_wrong_or_missing_folder(tmp_path, tiny_official):
    with pytest.raises(FileNotFoundError, match="not found"):
        detect_layout(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    with pytest.raises(CheckpointError, match="neither an official"):
        detect_layout(tmp_path / "junk")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_official, broken)
    (broken / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(FileNotFoundError, match="one VAE checkpoint .Wan2.1_VAE.pth or Wan2.2_VAE.pth"):
        detect_layout(broken)


def test_both_layouts_load_the_same_transformer(tiny_official, tiny_diffusers):
    a = load_transformer(tiny_official / "high_noise_model", "cpu", torch.float32)
    b = load_transformer(tiny_diffusers / "transformer", "cpu", torch.float32)
    assert a.cfg == b.cfg == SPECS["tiny"].dit  # architecture read from config.json
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(1, 16, 2, 4, 6)
    ctx = torch.randn(1, 5, a.cfg.text_dim)
    assert torch.equal(a(x, torch.tensor([500.0]), ctx), b(x, torch.tensor([500.0]), ctx))


def test_load_dtype_and_fp32_modulation(tiny_official):
    dit = load_transformer(tiny_official / "low_noise_model", "cpu", torch.bfloat16)
    assert dit.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert dit.blocks[0].modulation.dtype == torch.float32 and dit.head.modulation.dtype == torch.float32
    assert not any(p.is_meta for p in dit.parameters())


def test_vae_and_text_encoder_load_from_both_layouts(tiny_official, tiny_diffusers):
    va, vb = load_vae(tiny_official / "Wan2.1_VAE.pth", "cpu"), load_vae(tiny_diffusers / "vae", "cpu")
    assert va.cfg == vb.cfg
    z = torch.randn(1, 16, 2, 4, 4)
    assert torch.equal(va.decode(z), vb.decode(z))
    ta = load_text_encoder(tiny_official / "models_t5_umt5-xxl-enc-bf16.pth", tiny_official / "google/umt5-xxl",
                           "cpu", torch.float32)  # fmt: skip
    tb = load_text_encoder(
        tiny_diffusers / "text_encoder", tiny_diffusers / "tokenizer", "cpu", torch.float32
    )
    ea, eb = ta.encode(["a cat on a mat"])[0], tb.encode(["a cat on a mat"])[0]
    assert ea.shape[-1] == SPECS["tiny"].text_encoder.dim and torch.equal(ea, eb)


def test_missing_shard_is_named(tmp_path, tiny_official):
    folder = tmp_path / "expert"
    shutil.copytree(tiny_official / "high_noise_model", folder)
    shard = safetensors_files(folder, "diffusion_pytorch_model")[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_transformer(folder, "cpu", torch.float32)


def test_truncated_files_are_named(tmp_path, tiny_official):
    folder = tmp_path / "expert"
    shutil.copytree(tiny_official / "high_noise_model", folder)
    shard = safetensors_files(folder, "diffusion_pytorch_model")[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"truncated.*{shard.name}"):
        load_transformer(folder, "cpu", torch.float32)
    vae = tmp_path / "Wan2.1_VAE.pth"
    vae.write_bytes((tiny_official / "Wan2.1_VAE.pth").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        load_vae(vae, "cpu")


def test_config_that_does_not_match_the_weights(tmp_path, tiny_official):
    folder = tmp_path / "expert"
    shutil.copytree(tiny_official / "high_noise_model", folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_layers"] = 3  # the weights hold 2 blocks
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.2\."):
        load_transformer(folder, "cpu", torch.float32)
    cfg["num_layers"], cfg["ffn_dim"] = 2, 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.ffn\.0\.(weight|bias) has shape"):
        load_transformer(folder, "cpu", torch.float32)
