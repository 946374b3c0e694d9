"""Switching LoRA sets in a built pipeline (accel/lora_switch.py) equals a fresh build with that set, bit for
bit: weights and the latents of a run. Tiny model, CPU.

Every comparison is ``torch.equal``: the switcher runs the builder's own merge function (``merged_value``) on
the same base values in the same order on the same device, so no rounding may differ (fp32 and bf16)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from wanfast.accel.lora_switch import enable_lora_switching, live_tensor, plain_dit, switch_loras
from wanfast.builder import build_pipeline
from wanfast.config import ConfigError, EngineSettings, LoraSpec
from wanfast.loading.lora import checkpoint_source, read_lora
from wanfast.specs import SPECS
from wanfast.tools.lora_testing import write_random_lora
from wanfast.tools.testing import write_official_checkpoint

SPEC = SPECS["tiny"]
PARAMS = {"size": (64, 48), "frames": 5, "steps": 3, "seed": 7}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    ckpt = d / "ckpt"
    write_official_checkpoint(ckpt, SPEC, seed=0)  # float32 on disk
    a = write_random_lora(d / "a.safetensors", SPEC.dit, rank=4, seed=1, extras=True)
    b = write_random_lora(d / "b.safetensors", SPEC.dit, rank=8, seed=2)
    return ckpt, a, b


def _settings(dtype=torch.float32, **kw) -> EngineSettings:
    return EngineSettings(device="cpu", dtype=dtype, **kw)


def _state(pipe) -> dict[str, torch.Tensor]:
    """Every tensor of both experts (FP8 ones as their bytes: compared bit for bit)."""
    out = {}
    for n, e in pipe.experts.items():
        for k, v in plain_dit(e).state_dict().items():
            out[f"{n}.{k}"] = v.view(torch.uint8).clone() if v.dtype == torch.float8_e4m3fn else v.clone()
    return out


def _run(pipe) -> torch.Tensor:
    p = pipe.params("a fox", size=PARAMS["size"], frames=PARAMS["frames"], steps=PARAMS["steps"],
                    seed=PARAMS["seed"])  # fmt: skip
    return pipe.run(p).latents


# (file index, high, low) sets: A alone at per-expert strengths, B then A stacked, nothing, A again
SETS = [((0, 3.0, 1.5),), ((1, 1.0, 0.5), (0, 2.0, 2.0)), (), ((0, 3.0, 1.5),)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switching_equals_a_fresh_build_with_that_set(files, dtype):
    """A -> B+A -> none -> A in one pipeline; each state equal to a fresh build. bf16 from the float32
    checkpoint: the bases are the checkpoint's float32 values (checkpoint_source), as the builder merges."""
    ckpt, *paths = files
    pipe = build_pipeline(ckpt, _settings(dtype))
    plain = _state(pipe)
    lib = [read_lora(p) for p in paths]
    sources = {n: checkpoint_source(ckpt / f"{n}_model") for n in pipe.experts}
    enable_lora_switching(pipe, lib, sources)
    for sel in SETS:
        stack = [(lib[i], hi, lo) for i, hi, lo in sel]
        assert switch_loras(pipe, stack) >= 0
        loras = tuple(LoraSpec(paths[i], hi, lo) for i, hi, lo in sel)
        fresh = build_pipeline(ckpt, _settings(dtype, loras=loras))
        got, want = _state(pipe), _state(fresh)
        assert got.keys() == want.keys()
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, bad[:5]
        if not sel:
            assert all(torch.equal(got[k], plain[k]) for k in plain)  # none: the plain load again
        else:
            assert any(not torch.equal(got[k], plain[k]) for k in plain)  # the LoRA did change something
        if dtype == torch.float32:  # one run per set is enough: equal weights give equal latents
            assert torch.equal(_run(pipe), _run(fresh))


def test_fused_rows_and_only_changed_params_are_rewritten(files):
    ckpt, *paths = files
    pipe = build_pipeline(ckpt, _settings())
    dit = plain_dit(pipe.experts["high_noise"])
    q = live_tensor(dit, "blocks.0.self_attn.q.weight")
    assert q.data_ptr() == dit.blocks[0].self_attn.wqkv.weight.data_ptr()  # a view of the fused rows
    v_bias = live_tensor(dit, "blocks.0.self_attn.v.bias")
    c = SPEC.dit.dim
    assert v_bias.data_ptr() == dit.blocks[0].self_attn.wqkv.bias[2 * c :].data_ptr()
    lib = [read_lora(p) for p in paths]
    sw = enable_lora_switching(pipe, lib)
    params = {id(p): p for p in dit.parameters()}
    n = sw.switch([(lib[0], 1.0, 1.0)])
    assert n == 2 * len(lib[0].targets())  # every target, on both experts
    assert sw.switch([(lib[0], 1.0, 1.0)]) == 0  # the same set again: nothing to do
    assert sw.switch([(lib[0], 1.0, 2.0)]) == len(lib[0].targets())  # only the low-noise expert changed
    assert {id(p): p for p in dit.parameters()} == params  # same Parameter objects (compiled graphs hold)


def test_fp8_switching_requantises_as_a_fresh_fp8_build(files):
    """--quant fp8: the build merges, then quantises; the switch merges from the checkpoint's values and
    quantises the rows with the same quantiser, so qweight and scale match bit for bit (bf16 compute)."""
    ckpt, *paths = files
    settings = _settings(torch.bfloat16, quant="fp8")
    pipe = build_pipeline(ckpt, settings)
    lib = [read_lora(p) for p in paths]
    enable_lora_switching(pipe, lib, {n: checkpoint_source(ckpt / f"{n}_model") for n in pipe.experts})
    for sel in SETS[:3]:
        switch_loras(pipe, [(lib[i], hi, lo) for i, hi, lo in sel])
        loras = tuple(LoraSpec(paths[i], hi, lo) for i, hi, lo in sel)
        got, want = _state(pipe), _state(build_pipeline(ckpt, replace(settings, loras=loras)))
        assert any(k.endswith("qweight") for k in want)
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, bad[:5]


def test_unknown_file_and_fp8_without_a_checkpoint_are_refused(files):
    ckpt, *paths = files
    pipe = build_pipeline(ckpt, _settings())
    sw = enable_lora_switching(pipe, [read_lora(paths[1])])
    with pytest.raises(ValueError, match="no base"):
        sw.switch([(read_lora(paths[0]), 1.0, 1.0)])  # a.safetensors also has diffs B lacks
    merged = build_pipeline(ckpt, _settings(loras=(LoraSpec(paths[1], 1.0, 1.0),)))
    with pytest.raises(ConfigError, match="built without LoRAs"):
        enable_lora_switching(merged, [read_lora(paths[1])])
    fp8 = build_pipeline("tiny", _settings(quant="fp8"))
    with pytest.raises(ConfigError, match="FP8 layer.*no checkpoint"):
        enable_lora_switching(fp8, [read_lora(paths[0])])  # no source: the pre-quantisation values are gone


def test_expert_offload_switches_the_host_copies(files):
    """With --offload expert the masters are host copies; after a switch a run loads the new weights."""
    ckpt, *paths = files
    lib = [read_lora(p) for p in paths]
    pipe = build_pipeline(ckpt, _settings(offload="expert"))
    enable_lora_switching(pipe, lib)
    switch_loras(pipe, [(lib[1], 2.0, 1.0)])
    fresh = build_pipeline(ckpt, _settings(offload="expert", loras=(LoraSpec(paths[1], 2.0, 1.0),)))
    assert torch.equal(_run(pipe), _run(fresh))


def test_the_gpu_benchmark_script_runs_on_the_tiny_model(tmp_path):
    """benchmarks/lora_switch_gpu.py end to end on a CPU, so a device call does not find it broken."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "benchmarks" / "lora_switch_gpu.py"), "--model", "tiny", "--device", "cpu",
           "--rank", "4"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", OUT=str(tmp_path))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "lora_switch.json").read_text())
    for placement in ("device", "host"):
        r = res["results"][placement]
        assert "error" not in r, r
        assert len(r["rounds"]) == 2 and all(
            x["none_equals_plain"] and x["A_same_as_first"] for x in r["rounds"]
        )
        assert r["max_switch_s"] > 0 and r["base_bytes"] > 0
