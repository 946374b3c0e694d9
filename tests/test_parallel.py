"""wanfast.parallel on CPU with gloo: Ulysses 2/4, CFG-parallel and both combined give the single-process
latents; the tiled VAE decode stays within its stated bound; the torchrun-launched CLI writes from rank 0.
The overlapped Ulysses attention (``ulysses_chunks`` G >= 2) gives exactly the G = 1 result: every head
meets the same kernel on the same tokens (same shapes per head, same key length), only grouped differently.

Each world size is spawned once (processes are the expensive part on a 2-core runner) and runs all of its
cases; the parent holds the single-process references. 27 tokens (48x48, 9 frames) divide neither 2 nor 4
(padded to 28), 36 (64x48) divide both.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import random_dit, rel_err
from safetensors.torch import load_file

from wanfast import attention
from wanfast.accel.compile import compile_blocks
from wanfast.api import load_pipeline
from wanfast.builder import plan
from wanfast.config import ConfigError, EngineSettings
from wanfast.parallel import ulysses as ulysses_module
from wanfast.parallel.dist import check_split
from wanfast.parallel.vae import parallel_decode, ramp, tiles
from wanfast.specs import SPECS
from wanfast.tools.testing import write_official_checkpoint

STEPS, SEED, PROMPT = 2, 5, "a cat"  # timesteps 999, 833: one step of each expert
SIZES = {27: (48, 48), 36: (64, 48)}  # tokens -> (width, height); grid (3, 3, 3) and (3, 3, 4)
CASES = {  # world size -> [(name, cfg_parallel, ulysses, tokens)]
    2: [("u2-27", False, 2, 27), ("cfg2-36", True, 1, 36), ("u2-27-compiled", False, 2, 27), ("u2-27-c2", False, 2, 27)],
    4: [("u4-27", False, 4, 27), ("cfg2xu2-36", True, 2, 36), ("cfg2xu2-36-c2", True, 2, 36)],
}  # fmt: skip
# "-c2": ulysses_chunks 2 (the tiny DiT's 4 heads: 2 per rank under Ulysses 2, in 2 groups of 1); its latents
# must equal those of the case named without the suffix bit for bit
CHUNKS = {"u2-27-c2": 2, "cfg2xu2-36-c2": 2}
# The overlapped attention with more head groups needs more heads: a DiT of 8 heads (head_dim 8), Ulysses 2,
# so 4 heads per rank in G = 1, 2 or 4 groups, at 27 tokens (padded to 28) and 36
HEADS8 = replace(SPECS["tiny"].dit, num_heads=8)
GRIDS = {27: (1, 16, 3, 6, 6), 36: (1, 16, 3, 6, 8)}  # tokens -> latent x [B, C, F, H, W]; patch (1, 2, 2)
VAE_LATENTS = (1, 16, 2, 8, 40)  # split along w = 40 latent columns
# |tiled - single| in [-1, 1] pixel units at the default overlap (8 latent rows), random-weight tiny VAE:
# measured max 0.069 / mean 0.0030 at 4 ranks; the stated bound is max <= 0.1, mean <= 0.005.
VAE_MAX, VAE_MEAN = 0.1, 0.005


def _settings(**kw) -> EngineSettings:
    return EngineSettings(device="cpu", dtype=torch.float32, vae_dtype=torch.float32, **kw)


def _pipe(folder: Path, **kw):
    pipe = load_pipeline(folder, settings=_settings(**kw))
    pass  # the spec comes from the checkpoint
    return pipe


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recorder(seen: list[int]):
    return lambda module, args: seen.append(args[0].shape[1])  # x [B, tokens, C]


def _dit_inputs(tokens: int):
    """x [1, 16, F, H, W], t [1], context [[7, text_dim]]: the same on every rank and in the parent."""
    g = torch.Generator().manual_seed(tokens)
    return (
        torch.randn(GRIDS[tokens], generator=g),
        torch.tensor([700.0]),
        [torch.randn(7, HEADS8.text_dim, generator=g)],
    )


def _chunked_runs(rank: int, out: Path, calls: list[int]) -> None:
    """World 2: the 8-head DiT's forward and the bare attention under Ulysses 2 with G = 1, 2, 4 groups;
    ``calls``: the overlapped attentions counter (``_worker``)."""
    res = {}
    with torch.no_grad():
        for chunks in (1, 2, 4):
            calls[0] = 0
            dit = random_dit(HEADS8, seed=0)
            sp = ulysses_module.apply_ulysses(dit, dist.group.WORLD, chunks=chunks)
            assert sp.chunks == chunks
            for tokens in GRIDS:
                res[f"dit-{tokens}-g{chunks}"] = dit(*_dit_inputs(tokens))
            # the bare op: q, k, v [1, l, 8, 8], this rank's 14 of 28 padded tokens (L = 27)
            g = torch.Generator().manual_seed(100 + rank)
            q, k, v = (torch.randn(1, 14, 8, 8, generator=g) for _ in range(3))
            sp.seq_len = 27
            fn = sp.attend if chunks == 1 else sp.attend_overlapped
            res[f"attn-g{chunks}"] = fn(attention._sdpa, q, k, v)
            res[f"overlapped-g{chunks}"] = calls[0]
    try:
        ulysses_module.UlyssesPlan(dist.group.WORLD, 8, chunks=3)
    except ValueError as e:
        res["error"] = str(e)
    torch.save(res, out / f"chunked-{rank}.pt")


def _worker(rank: int, world: int, port: int, folder: Path, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # count the overlapped attentions: the setting must reach the plan (a -c2 case) or stay off (the others)
    overlapped, calls = ulysses_module.UlyssesPlan.attend_overlapped, [0]

    def counting(self, *args):
        calls[0] += 1
        return overlapped(self, *args)

    ulysses_module.UlyssesPlan.attend_overlapped = counting
    try:
        if world == 2:
            _chunked_runs(rank, out, calls)
        for name, cfg_parallel, ulysses, tokens in CASES[world]:
            calls[0] = 0
            pipe = _pipe(
                folder, cfg_parallel=cfg_parallel, ulysses=ulysses, ulysses_chunks=CHUNKS.get(name, 1)
            )
            seen = []  # (tokens this rank's head saw) per DiT forward: proves the split happened
            for dit in pipe.experts.values():
                dit.head.register_forward_pre_hook(_recorder(seen))
            compiled = name.endswith("-compiled")
            ops = set()  # call targets in the traced block graphs

            def record(gm, inputs, ops=ops):
                ops.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
                return gm.forward

            if compiled:  # regional compile as accel applies it, traced by Dynamo (fullgraph: no breaks)
                torch._dynamo.reset()
                for dit in pipe.experts.values():
                    compile_blocks(dit, backend=record)
            res = pipe.generate(PROMPT, size=SIZES[tokens], steps=STEPS, seed=SEED)
            saved = {"latents": res.latents, "frames": res.frames, "seen": seen, "ops": sorted(ops)}
            saved["overlapped"] = calls[0]
            torch.save(saved, out / f"{name}-{rank}.pt")
        z = torch.randn(VAE_LATENTS, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            vae = {"tiled": parallel_decode(pipe.vae, z), "whole": parallel_decode(pipe.vae, z, overlap=99)}
        torch.save(vae, out / f"vae-{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_official_checkpoint(tmp_path_factory.mktemp("tiny"), SPECS["tiny"], seed=0)


@pytest.fixture(scope="module")
def reference(folder):
    """Single-process latents and frames per token count, and the single VAE decode."""
    pipe = _pipe(folder)
    refs = {n: pipe.generate(PROMPT, size=size, steps=STEPS, seed=SEED) for n, size in SIZES.items()}
    z = torch.randn(VAE_LATENTS, generator=torch.Generator().manual_seed(0))
    # The ranks decode with one thread each (_worker): decode the reference with one thread too, so the
    # whole-frame tile runs the same kernels in the same reduction order and must match it exactly. With
    # the machine's thread count the convolutions sum in another order (1.5e-6 apart on 2 cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return refs, pipe.vae.decode(z)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=[2, 4])
def spawned(request, folder, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(_worker, args=(world, _free_port(), folder, out), nprocs=world, join=True)
    return world, out


def test_split_runs_match_single_process(spawned, reference):
    world, out = spawned
    refs, _ = reference
    for name, cfg_parallel, ulysses, tokens in CASES[world]:
        ref = refs[tokens]
        for rank in range(world):  # every rank ends with the same latents
            got = torch.load(out / f"{name}-{rank}.pt")
            # one DiT pass per step under CFG-parallel (two otherwise), on ceil(L / ulysses) tokens
            local = -(-tokens // ulysses)
            assert got["seen"] == [local] * STEPS * (1 if cfg_parallel else 2), (name, got["seen"])
            # self-attention calls: one per block (2) per DiT pass, overlapped only under ulysses_chunks
            passes = STEPS * (1 if cfg_parallel else 2) * SPECS["tiny"].dit.num_layers
            assert got["overlapped"] == (passes if name in CHUNKS else 0), (name, got["overlapped"])
            if name.endswith("-compiled"):  # the all-to-alls sit in one opaque op inside the block graph
                assert "wanfast.ulysses_self_attention.default" in got["ops"], got["ops"]
            err = rel_err(got["latents"], ref.latents)
            assert err <= 1e-5, f"{name} rank {rank}: rel err {err:.2e}"
            # frames come from the tiled decode: 8 latent columns, overlap 8, so every tile is the whole frame
            diff = (got["frames"].int() - ref.frames.int()).abs().max().item()
            assert diff <= 1, f"{name} rank {rank}: frames differ by {diff}"


@pytest.fixture(scope="module")
def heads8_reference():
    """The 8-head DiT in one process, with the ranks' thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return {tokens: random_dit(HEADS8, seed=0)(*_dit_inputs(tokens)) for tokens in GRIDS}
    finally:
        torch.set_num_threads(threads)


def test_overlapped_ulysses_equals_blocking(spawned, heads8_reference):
    """The -c2 pipeline cases give their blocking case's latents bit for bit (Ulysses 2 at 27 tokens, padded;
    CFG 2 x Ulysses 2 at 36). World 2 also: G = 2 and 4 head groups give the G = 1 outputs of the 8-head DiT
    bit for bit (forward at 27 tokens and 36; the bare attention at 27), and G = 1 the single-process
    forward (rel err <= 1e-5, as above)."""
    world, out = spawned
    cases = [name for name, *_ in CASES[world] if name in CHUNKS]
    assert cases  # each world runs one
    for name in cases:
        for rank in range(world):
            got, base = (torch.load(out / f"{n}-{rank}.pt") for n in (name, name.removesuffix("-c2")))
            assert torch.equal(got["latents"], base["latents"]), (name, rank)
    if world == 4:
        return  # the 8-head runs are world 2's
    for rank in range(2):
        got = torch.load(out / f"chunked-{rank}.pt")
        # G >= 2 took the overlapped path: per forward one call per block, and the bare call
        layers = HEADS8.num_layers
        assert [got[f"overlapped-g{c}"] for c in (1, 2, 4)] == [0] + [len(GRIDS) * layers + 1] * 2, got
        for key in [f"dit-{tokens}" for tokens in GRIDS] + ["attn"]:
            for chunks in (2, 4):
                assert torch.equal(got[f"{key}-g{chunks}"], got[f"{key}-g1"]), (key, chunks, rank)
        for tokens, ref in heads8_reference.items():
            err = rel_err(got[f"dit-{tokens}-g1"], ref)
            assert err <= 1e-5, f"{tokens} tokens rank {rank}: rel err {err:.2e}"
        expected = "ulysses chunks 3 must divide the 4 heads per rank (8 attention heads over ulysses 2)"
        assert got["error"] == expected


def test_bad_chunks_fail_before_loading(monkeypatch):
    """The settings, the split check and the builder's plan step (which loads nothing) refuse chunks that
    do not divide the heads per rank, naming the numbers."""
    with pytest.raises(ConfigError, match="ulysses_chunks must be an integer >= 1, got 0"):
        EngineSettings(ulysses_chunks=0)
    with pytest.raises(ConfigError, match=r"chunks 3 must divide the 20 heads per rank \(40 attention heads"):
        check_split(False, 2, 2, 40, 3)
    check_split(False, 2, 2, 40, 4)  # 20 heads per rank in 4 groups of 5
    check_split(False, 1, 1, 40, 3)  # no Ulysses: the chunks do nothing and are not checked
    monkeypatch.setenv("WORLD_SIZE", "2")
    bad = _settings(ulysses=2, ulysses_chunks=4)  # the tiny DiT: 4 heads, 2 per rank
    with pytest.raises(ConfigError, match=r"chunks 4 must divide the 2 heads per rank \(4 attention heads"):
        plan("tiny", bad)
    assert plan("tiny", replace(bad, ulysses_chunks=2)).settings.ulysses_chunks == 2


def test_tiled_vae_decode_within_bound(spawned, reference):
    world, out = spawned
    _, single = reference
    for rank in range(world):
        got = torch.load(out / f"vae-{rank}.pt")
        assert got["tiled"].shape == single.shape
        assert (got["whole"] - single).abs().max().item() <= 1e-6  # whole-frame tiles: blend is exact
        err = (got["tiled"] - single).abs()
        assert 0 < err.max() <= VAE_MAX and err.mean() <= VAE_MEAN, (
            f"rank {rank}: {err.max():.4f} {err.mean():.5f}"
        )


def test_tile_weights_partition_unity():
    n, overlap, stride = 24, 3, 8  # cores of 6 >= 2 * overlap: seams do not touch
    total = torch.zeros(n * stride)
    for lo, hi in tiles(n, 4, overlap):
        w = ramp(lo, hi, n, overlap, stride, torch.device("cpu"))
        assert (w > 0).all()
        total[lo * stride : hi * stride] += w
    assert torch.allclose(total, torch.ones_like(total))  # across each seam the two ramps sum to 1


def test_torchrun_cli_writes_from_rank_zero_only(tmp_path, reference):
    refs, _ = reference
    out, lat = tmp_path / "v.mp4", tmp_path / "v.safetensors"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "wanfast", "generate",
        "--model", "tiny", "--cfg-parallel", "--prompt", PROMPT, "--size", "64x48", "--steps", str(STEPS),
        "--seed", str(SEED), "--device", "cpu", "--output", str(out), "--save-latents", str(lat), "--no-progress",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("VAE decode") == 1  # one summary: rank 0's
    assert out.exists() and rel_err(load_file(lat)["latents"], refs[36].latents) <= 1e-5
