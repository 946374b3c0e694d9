"""FP8 linears (accel/fp8.py), ``optimize_dit`` with quant, and the FP8 checkpoint (quantize.py) on CPU.

On CPU FP8Linear runs its dequantised float32 reference, the same quantised math as ``_scaled_mm``.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import rel_err
from torch import nn

from wanfast.accel import optimize_dit
from wanfast.accel.fp8 import (
    FP8,
    FP8Linear,
    Policy,
    fp8_modules,
    parameter_bytes,
    quantize_dit_,
    quantize_rows,
)
from wanfast.accel.fp8_checkpoint import MARKER, is_fp8_checkpoint, load_fp8_transformer
from wanfast.accel.fuse import fuse_projections
from wanfast.config import ConfigError, EngineSettings
from wanfast.loading.layout import load_transformer
from wanfast.models.dit import WanDiT
from wanfast.specs import SPECS
from wanfast.tools.quantize import quantize_checkpoint

TINY = SPECS["tiny"].dit
CPU = EngineSettings(device="cpu", dtype=torch.float32, compile=False)


def tiny_dit(seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(TINY).to(dtype).eval().requires_grad_(False)


def dit_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 8, 12, generator=g)
    return x, torch.tensor([700.0]), torch.randn(1, 20, TINY.text_dim, generator=g)


def test_quantize_rows_roundtrip_and_scale():
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows over six decades
    x8, s = quantize_rows(x)
    assert x8.dtype == FP8 and s.shape == (64, 1)
    assert torch.equal(x8.float().abs().amax(-1), torch.full((64,), 448.0))  # each row uses the full range
    # e4m3 has 3 mantissa bits: round to nearest is within 2^-4 relative of each normal value
    err = ((x8.float() * s - x).abs() / x.abs().clamp(min=s * 2**-6)).amax()
    assert err <= 2**-4 + 1e-6
    assert torch.equal(quantize_rows(torch.zeros(2, 16))[0].float(), torch.zeros(2, 16))  # no 0/0


def test_fp8_linear_error_bound_and_exact_reference():
    torch.manual_seed(0)
    lin = nn.Linear(512, 384)
    x = torch.randn(3, 40, 512)
    q = FP8Linear.from_linear(lin)
    assert q.qweight.dtype == FP8 and q.scale.shape == (384,) and q.scale.dtype == torch.float32
    assert not q.use_scaled_mm  # CPU: the reference path
    y, ref = q(x), lin(x)
    err = rel_err(y, ref)
    # Two e4m3 roundings (activation and weight), each ~2^-4 relative at worst, ~2-3% RMS on random data.
    assert 0.005 < err < 0.05, err
    # The reference is exactly the dequantise-then-matmul of the manual quantisation.
    xs = x.reshape(-1, 512)
    amax = xs.abs().amax(-1, keepdim=True) / 448.0
    x_dq = (xs / amax).clamp(-448, 448).to(FP8).float() * amax
    w_amax = lin.weight.abs().amax(-1, keepdim=True) / 448.0
    w_dq = (lin.weight / w_amax).to(FP8).float() * w_amax
    manual = torch.nn.functional.linear(x_dq, w_dq, lin.bias).reshape(3, 40, 384)
    assert torch.equal(y, manual)


def test_fp8_linear_bf16_input_and_weight_dtype_marker():
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    q = FP8Linear.from_linear(lin)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert q.weight.dtype == torch.bfloat16 and q.weight.numel() == 0  # what callers cast inputs to
    y = q(x)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 32)
    assert rel_err(y, lin(x)) < 0.06


def test_quantize_dit_respects_policy_and_halves_memory():
    dit = tiny_dit()
    fuse_projections(dit)
    bf16_block_bytes = parameter_bytes(dit.blocks)
    quantize_dit_(dit, Policy(keep_blocks=(1,), keep_types=("cross_attn.o",)))
    names = set(fp8_modules(dit))
    expected = {f"blocks.0.{n}" for n in ("self_attn.wqkv", "self_attn.o", "cross_attn.q", "cross_attn.wkv",
                                           "ffn.0", "ffn.2")}  # fmt: skip
    assert names == expected
    for name in ("blocks.1.self_attn.wqkv", "blocks.0.cross_attn.o", "text_embedding.0", "head.head"):
        assert type(dit.get_submodule(name)) is nn.Linear
    assert dit.time_embedding[0].weight.dtype == torch.bfloat16
    assert dit.blocks[0].modulation.dtype == torch.bfloat16  # not a Linear: untouched
    assert all(m.qweight.dtype == FP8 for m in fp8_modules(dit).values())
    # Everything FP8 in block 0 but cross_attn.o: its linear bytes ~halve (bf16 2 B -> fp8 1 B + scales).
    full = tiny_dit()
    fuse_projections(full)
    quantize_dit_(full)
    ratio = parameter_bytes(full.blocks) / bf16_block_bytes
    assert 0.5 < ratio < 0.56, ratio
    assert not any(p.dtype == torch.bfloat16 and p.dim() == 2 for p in full.blocks.parameters())


def test_quantized_dit_output_close_to_bf16():
    x, t, ctx = dit_inputs()
    ref_model = tiny_dit(dtype=torch.float32)
    ref = ref_model(x, t, ctx)
    bf16 = tiny_dit()(x, t, ctx)
    q = quantize_dit_(tiny_dit_fused())(x, t, ctx)
    err_bf16, err_fp8 = rel_err(bf16, ref), rel_err(q, ref)
    assert err_fp8 < 0.03, err_fp8  # FP8 block linears, 2 blocks at dim 64 (measured 0.008)
    assert err_fp8 > 1.5 * err_bf16  # lossy beyond bf16 (measured 0.003): the FP8 path really ran


def tiny_dit_fused() -> WanDiT:
    dit = tiny_dit()
    fuse_projections(dit)
    return dit


def test_optimize_dit_applies_quant_only_when_asked():
    assert not fp8_modules(optimize_dit(tiny_dit(), replace(CPU, dtype=torch.bfloat16)))
    dit = optimize_dit(tiny_dit(), replace(CPU, dtype=torch.bfloat16, quant="fp8"))
    fp8 = fp8_modules(dit)
    assert "blocks.0.self_attn.wqkv" in fp8 and "blocks.1.cross_attn.wkv" in fp8  # fused, then quantised
    assert len(fp8) == 2 * 7  # wqkv, o, q, wkv, o, ffn.0, ffn.2 per block
    with pytest.raises(ValueError, match="quant"):
        optimize_dit(tiny_dit(), replace(CPU, quant="int4"))


def test_quantize_checkpoint_roundtrip(tiny_official, tmp_path):
    dst = tmp_path / "fp8"
    done = quantize_checkpoint(tiny_official, dst)
    assert len(done) == 2 and all(d["fp8_linears"] == 2 * 10 for d in done)  # unfused: q,k,v,o x2 + ffn x2
    expert = dst / "high_noise_model"
    assert is_fp8_checkpoint(expert) and MARKER in json.loads((expert / "config.json").read_text())
    assert (dst / "Wan2.1_VAE.pth").exists() and (dst / "google" / "umt5-xxl").is_dir()
    loaded = load_fp8_transformer(expert, "cpu", torch.bfloat16)
    assert loaded.blocks[0].self_attn.wqkv.qweight.dtype == FP8
    assert loaded.blocks[0].modulation.dtype == torch.float32
    # In memory: bf16 load, fuse, quantise. Per-channel scales: identical weights, identical outputs.
    mem = load_transformer(tiny_official / "high_noise_model", "cpu", torch.bfloat16)
    fuse_projections(mem)
    quantize_dit_(mem)
    x, t, ctx = dit_inputs()
    assert torch.equal(loaded(x, t, ctx), mem(x, t, ctx))
    assert set(fp8_modules(loaded)) == set(fp8_modules(mem))
    assert not fp8_modules(optimize_dit(load_transformer(tiny_official / "high_noise_model", "cpu"),
                                        replace(CPU, dtype=torch.bfloat16)))  # fmt: skip
    with pytest.raises(ConfigError, match="exists and is not an empty folder"):  # never overwritten
        quantize_checkpoint(tiny_official, dst)


def test_the_builder_dispatches_fp8_folders(tiny_official, tmp_path):
    """An FP8 folder loads through the builder (``_load_dit``: ``load_fp8_transformer``), already fused and
    quantised; the plain loader refuses it, pointing there, rather than loading it wrong."""
    from wanfast import builder

    quantize_checkpoint(tiny_official, tmp_path / "fp8")
    expert = tmp_path / "fp8" / "low_noise_model"
    with pytest.raises(ConfigError, match="FP8 checkpoint: load it with wanfast.load_pipeline"):
        load_transformer(expert, "cpu", torch.bfloat16)
    bf16 = replace(CPU, dtype=torch.bfloat16)
    dit = builder._load_dit(expert, "cpu", bf16)
    assert fp8_modules(dit) and optimize_dit(dit, bf16) is dit
    x, t, ctx = dit_inputs()
    assert torch.equal(dit(x, t, ctx), load_fp8_transformer(expert, "cpu", torch.bfloat16)(x, t, ctx))
    # the whole build: the plan knows the checkpoint is FP8, and both experts come out quantised
    planned = builder.plan(tmp_path / "fp8", bf16)
    assert planned.fp8_checkpoint and not builder.plan(tiny_official, bf16).fp8_checkpoint
    pipe = builder.build(planned)
    assert all(set(fp8_modules(d)) == set(fp8_modules(dit)) for d in pipe.experts.values())


def test_quantize_diffusers_layout_matches_official(tiny_official, tiny_diffusers, tmp_path):
    quantize_checkpoint(tiny_diffusers, tmp_path / "d")
    assert (tmp_path / "d" / "model_index.json").exists() and (tmp_path / "d" / "vae").is_dir()
    quantize_checkpoint(tiny_official, tmp_path / "o")
    a = load_fp8_transformer(tmp_path / "d" / "transformer", "cpu")  # high-noise expert in Diffusers naming
    b = load_fp8_transformer(tmp_path / "o" / "high_noise_model", "cpu")
    x, t, ctx = dit_inputs()
    assert torch.equal(a(x, t, ctx), b(x, t, ctx))


def test_gemm_path_follows_the_run_device_not_where_weights_were_built(monkeypatch):
    """Offload modes quantise experts on the CPU and move weight storage by ``.data`` (no ``.to()``), so
    optimize_dit chooses the FP8 GEMM from settings.device; compile likewise (None = on for CUDA)."""
    import wanfast.accel as accel
    import wanfast.accel.fp8 as fp8

    monkeypatch.setattr(fp8, "_scaled_mm_capable", lambda device: device.type == "cuda")
    compiled = []
    monkeypatch.setattr(
        accel, "compile_blocks", lambda dit, backend, mode: compiled.append(dit) or len(dit.blocks)
    )
    monkeypatch.setattr(accel, "choose_attention", lambda settings: "sdpa")
    torch.manual_seed(0)
    dit = WanDiT(SPECS["tiny"].dit).eval()  # built on the CPU
    settings = EngineSettings(device="cuda", quant="fp8", compile=None)
    optimize_dit(dit, settings)
    layers = list(fp8_modules(dit).values())
    assert layers and all(layer.use_scaled_mm for layer in layers)
    assert compiled == [dit]
    dit2 = WanDiT(SPECS["tiny"].dit).eval()
    optimize_dit(dit2, replace(settings, device="cpu"))
    assert not any(layer.use_scaled_mm for layer in fp8_modules(dit2).values()) and compiled == [dit]


def test_lora_merges_before_quantisation(tiny_official, tmp_path):
    """The turbo combination (a LoRA + ``--quant fp8``): the builder merges the LoRA into the bf16 weights
    (fp32 sum, one cast) and quantises the merged weights; quantising first and merging after could not
    even be written back into e4m3. Equal bit for bit to quantising the merged model by hand."""
    from test_lora import _pairs, _write

    from wanfast.api import load_pipeline

    bf16 = EngineSettings(device="cpu", dtype=torch.bfloat16, vae_dtype=torch.float32, compile=False)
    base = load_pipeline(tiny_official, settings=bf16.plain())
    lora = _write(tmp_path / "l.safetensors", _pairs(base.experts["high_noise"].float(), seed=3), "kohya")
    with_lora = replace(bf16, lora_high_noise=lora, lora_low_noise=lora)
    merged = load_pipeline(tiny_official, settings=with_lora)  # fused q/k/v, bf16
    turbo = load_pipeline(tiny_official, settings=replace(with_lora, quant="fp8"))
    base_q = load_pipeline(tiny_official, settings=replace(bf16, quant="fp8"))
    for expert in ("high_noise", "low_noise"):
        got = fp8_modules(turbo.experts[expert])
        want = fp8_modules(quantize_dit_(merged.experts[expert]))
        plain = fp8_modules(base_q.experts[expert])
        assert got and list(got) == list(want)
        for name, m in got.items():
            assert torch.equal(m.qweight.view(torch.uint8), want[name].qweight.view(torch.uint8)), name
            assert torch.equal(m.scale, want[name].scale), name
        changed = [n for n in got if not torch.equal(got[n].qweight.view(torch.uint8),
                                                     plain[n].qweight.view(torch.uint8))]  # fmt: skip
        assert changed  # the LoRA reached the FP8 weights
