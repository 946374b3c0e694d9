"""Memory modes (wanfast.accel.offload) on the CPU: offloaded runs equal resident runs bit for bit, the
residency bookkeeping (what is on the "device" when, prefetch order, freeing), and the memory chooser.

CPU -> CPU moves are no-ops, so the equality tests poison every offloaded tensor (NaN) while it is not
resident: a block or expert that ran without being loaded first would turn the latents into NaN."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from wanfast import load_pipeline
from wanfast.accel import offload
from wanfast.accel.offload import MemoryBudgetError, choose_mode, estimate_memory, weight_sizes
from wanfast.config import EngineSettings
from wanfast.specs import SPECS
from wanfast.tools.testing import write_official_checkpoint

LAYERS = 4
PRESET = replace(SPECS["tiny"], dit=replace(SPECS["tiny"].dit, num_layers=LAYERS))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("offload-ckpt")
    write_official_checkpoint(folder, PRESET, seed=0)
    return folder


@pytest.fixture
def poisoned(monkeypatch):
    """Unloaded tensors read NaN; ``load`` restores the real host copy."""

    def unload(self) -> None:
        for t, h in zip(self.tensors, self.host, strict=True):
            t.data = torch.full_like(h, float("nan"))
        self.record.free(self.key)

    monkeypatch.setattr(offload.HostCopy, "unload", unload)


def _pipe(ckpt, mode: str | None, **kw):
    settings = EngineSettings(device="cpu", dtype=torch.float32, vae_dtype=torch.float32, offload=mode, **kw)
    pipe = load_pipeline(ckpt, settings=settings)
    pass  # the spec comes from the checkpoint
    return _rehome(pipe) if mode == "blocks" else pipe


def _run(pipe, seed: int = 1):
    out = pipe.generate("a red fox", steps=4, seed=seed)
    assert out.steps_per_expert["high_noise"] > 0 and out.steps_per_expert["low_noise"] > 0
    return out.latents


def _rehome(pipe):
    """Give every expert tensor fresh (64-byte aligned) memory, as offloading does. The loader's CPU tensors
    are views of the mapped file at 8-byte aligned offsets, and CPU BLAS rounds differently for unaligned
    operands (1e-7 on one time-embedding linear, measured): equality is about the weights' bits, so both
    sides get aligned copies."""
    for dit in pipe.experts.values():
        dit = getattr(dit, "dit", dit)  # an OffloadedExpert wraps the DiT
        for name, child in dit.named_children():
            if (
                getattr(pipe, "offload", None) is None or name != "blocks"
            ):  # blocks mode keeps the rest where it was loaded
                for t in offload._tensors(child):
                    t.data = t.data.clone()
    return pipe


@pytest.fixture(scope="module")
def resident(ckpt):
    return _run(_rehome(_pipe(ckpt, None)))


@pytest.mark.parametrize("mode", ["expert", "blocks"])
def test_offloaded_equals_resident(ckpt, resident, poisoned, mode):
    pipe = _pipe(ckpt, mode)
    assert pipe.offload.mode == mode
    latents = _run(pipe)
    assert torch.isfinite(latents).all()
    assert torch.equal(latents, resident)


def test_blocks_equal_with_plain_settings(ckpt, poisoned):
    """No caches: the cross-attention K/V come from the block weights on every call."""
    plain = {"fuse_projections": False, "cache_cross_kv": False, "cache_rope": False}
    ref = _run(_rehome(_pipe(ckpt, None, **plain)))
    assert torch.equal(_run(_pipe(ckpt, "blocks", **plain)), ref)


def _replay(trace):
    """Replay a residency trace: (max blocks resident at once, [(loaded key, keys resident before)])."""
    resident, peak, loads = set(), 0, []
    for op, key in trace:
        if op == "load":
            loads.append((key, set(resident)))
            resident.add(key)
            peak = max(peak, len(resident))
        else:
            resident.discard(key)
    return peak, loads


def test_blocks_bookkeeping(ckpt):
    pipe = _pipe(ckpt, "blocks")
    record = pipe.offload.record
    assert record.resident == set()  # nothing on the device before the first forward
    _run(pipe)
    assert record.peak == 2
    peak, loads = _replay(record.trace)
    assert peak == 2
    forwards = sum(1 for key, _ in loads if key[1] == 1)  # block 1 is loaded once per forward
    assert forwards >= 4  # 4 steps (with CFG: two forwards per step)
    for (expert, j), before in loads:
        if (expert, (j - 1) % LAYERS) in before:
            continue  # prefetched while block j - 1 ran (block 0 during the last block)
        # fetched on demand: only block 0 of a forward with nothing of this expert resident
        assert j == 0 and not any(k[0] == expert for k in before), (expert, j, before)
    # the last free of each finished block happens after the next block's load: prefetch order
    trace = list(record.trace)
    for i, (op, key) in enumerate(trace):
        if op == "free" and key in {k for _, k in trace[:i]} and trace[i - 1][0] == "load":
            assert trace[i - 1][1] == (key[0], (key[1] + 1) % LAYERS)
    # after the switch to the low-noise expert, the high-noise one holds nothing on the device
    assert all(k[0] == "low_noise" for k in record.resident)
    assert len(record.resident) == 1  # the low-noise block 0, prefetched for a next forward


def test_expert_swaps_once_at_boundary(ckpt):
    pipe = _pipe(ckpt, "expert")
    record = pipe.offload.record
    assert record.resident == {"high_noise"} and record.loads == 1  # resident from the start
    _run(pipe)
    assert record.loads == 2 and record.resident == {"low_noise"}
    assert [e for e in record.trace if e[0] == "load"] == [("load", "high_noise"), ("load", "low_noise")]
    _run(pipe, seed=2)  # low -> high at the start, high -> low at the boundary
    assert record.loads == 4 and record.peak == 1


def test_estimate_and_chooser():
    big = SPECS["t2v-A14B"]
    sizes = weight_sizes(big)
    assert 27e9 < sizes.expert < 30e9  # ~14.3B parameters in bf16
    size, frames = (1280, 720), 81
    need = {m: estimate_memory(big, size, frames, m) for m in (None, "expert", "blocks")}
    assert need[None] > need["expert"] > need["blocks"]
    for m in need:  # monotonic in frames and in size
        assert estimate_memory(big, size, 41, m) <= need[m] <= estimate_memory(big, size, 121, m)
        assert estimate_memory(big, (832, 480), frames, m) < need[m]
    gib = offload.GiB
    assert choose_mode(big, size, frames, need[None] + gib) is None
    assert choose_mode(big, size, frames, need[None] - 1) == "expert"
    assert choose_mode(big, size, frames, need["expert"] - 1) == "blocks"
    with pytest.raises(MemoryBudgetError, match="no mode fits"):
        choose_mode(big, size, frames, need["blocks"] - 1)
    with pytest.raises(MemoryBudgetError, match=r"resident does not fit.*use --offload expert") as err:
        choose_mode(big, size, frames, need[None] - 1, requested=None)
    assert "this GPU has" in str(err.value) and "--offload blocks ~" in str(err.value)
    with pytest.raises(MemoryBudgetError, match=r"--offload expert does not fit.*use --offload blocks"):
        choose_mode(big, size, frames, need["expert"] - 1, requested="expert")
    assert choose_mode(big, size, frames, need["expert"], requested="blocks") == "blocks"


def test_weight_sizes_from_pipeline(ckpt):
    pipe = _pipe(ckpt, None)
    dit = pipe.experts["high_noise"]
    total = sum(p.numel() * 4 for p in dit.parameters())
    sizes = weight_sizes(pipe)
    assert sizes.expert == total and sizes.num_experts == 2
    assert sizes.block == sum(p.numel() * 4 for p in dit.blocks[0].parameters())
    assert sizes.non_block == total - LAYERS * sizes.block
    assert estimate_memory(pipe, (64, 48), 9, "blocks") < estimate_memory(pipe, (64, 48), 9, None)


def test_offload_rejects_cuda_graphs_and_unknown_mode(ckpt):
    pipe = _pipe(ckpt, None)
    with pytest.raises(offload.ConfigError, match="unknown offload mode"):
        offload.apply_offload(pipe, "layers")
    pipe.settings = replace(pipe.settings, cuda_graphs=True)
    with pytest.raises(offload.ConfigError, match="CUDA graphs"):
        offload.apply_offload(pipe, "expert")


@pytest.mark.parametrize("mode", ["expert", "blocks"])
def test_one_dit_model_offloads(mode):
    """TI2V-5B has one DiT ("dit"): expert mode keeps it resident from the start, blocks mode streams it.
    Bound: the CPU BLAS rounds unaligned (memory-mapped) and aligned (offloaded) operands apart by ~1e-7
    per linear (see _rehome); over 2 layers x 2 steps that stays far below 1e-5."""
    from helpers import rel_err

    from wanfast.builder import build_pipeline

    settings = EngineSettings(device="cpu", dtype=torch.float32, vae_dtype=torch.float32)
    ref = build_pipeline("tiny-ti2v", settings).generate("a fox", steps=2, seed=3).latents
    pipe = build_pipeline("tiny-ti2v", replace(settings, offload=mode))
    got = pipe.generate("a fox", steps=2, seed=3)
    assert pipe.offload.mode == mode and got.steps_per_expert == {"dit": 2}
    assert rel_err(got.latents, ref) <= 1e-5
