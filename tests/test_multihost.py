"""One video over two hosts, as two torchrun launchers on loopback (gloo, the tiny model on the CPU): each
launcher is a "node" with one process, they meet at the rendezvous endpoint, and the CFG-parallel run
writes the same video as one plain process.

Both rendezvous styles a multi-host launch uses are run: ``static`` (each host is given its --node-rank)
and ``c10d`` (the hosts share an --rdzv-id and the rendezvous numbers them). README "Multi-host" has the
same commands for real hosts.

Tolerance: none, bit for bit. Every process (the two ranks and the reference) runs one thread
(OMP_NUM_THREADS=1), so each kernel sums in the same order wherever it runs. Rank 0 runs the conditional
DiT pass and rank 1 the unconditional one, each the same [1, C, F', H', W'] forward on the same weights
(the tiny model's seed) that the reference runs as its two passes; gloo's all-gather copies the
predictions' bytes and both ranks combine them with the reference's formula, so the latents are equal.
At 64x48 the latent width (8) is within the VAE tiles' overlap (8 rows), so each rank decodes the whole
frame and the blend is (x * 1 + x * 1) / 2 = x exactly; equal frames encode to equal MP4 bytes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["generate", "--model", "tiny", "--prompt", "a cat", "--size", "64x48", "--steps", "2",
        "--seed", "5", "--device", "cpu", "--no-progress", "--output", "v.mp4",
        "--save-latents", "v.safetensors"]  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    # one thread everywhere (the module docstring); this checkout first on the path, for the subprocesses
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """The plain one-process run (both CFG passes in one process)."""
    out = tmp_path_factory.mktemp("single")
    proc = subprocess.run([sys.executable, "-m", "wanfast", *ARGS], capture_output=True, text=True,
                          timeout=300, env=_env(), cwd=out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_two_launchers_write_the_single_process_video(tmp_path, single, backend):
    port = _free_port()
    nodes = [tmp_path / f"node{i}" for i in range(2)]  # each launcher in its own folder, as on its own host
    procs = []
    for i, cwd in enumerate(nodes):
        cwd.mkdir()
        rdzv = ["--node-rank", str(i)] if backend == "static" else ["--rdzv-id", f"test-{port}"]
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", backend, *rdzv, "--rdzv-endpoint", f"127.0.0.1:{port}",
            "-m", "wanfast", *ARGS, "--cfg-parallel",
        ]  # fmt: skip
        with open(cwd / "out.txt", "w") as out, open(cwd / "err.txt", "w") as err:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=_env(), cwd=cwd))
    # a launcher that fails leaves the other waiting at the rendezvous: stop at the first failure
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:  # SIGTERM first: torchrun passes it on to its worker, which SIGKILL would orphan
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    outs = [((cwd / "out.txt").read_text(), (cwd / "err.txt").read_text()) for cwd in nodes]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], "\n".join(
        f"node {i} ({c}): {e[-2000:]}" for i, (c, (_, e)) in enumerate(zip(codes, outs, strict=True))
    )
    # exactly one launcher holds global rank 0 (c10d decides which), and only it writes and reports
    writers = [cwd for cwd in nodes if (cwd / "v.mp4").exists()]
    assert len(writers) == 1, writers
    assert sum(out.count("VAE decode") for out, _ in outs) == 1
    got, ref = (
        load_file(writers[0] / "v.safetensors")["latents"],
        load_file(single / "v.safetensors")["latents"],
    )
    assert got.shape == ref.shape and torch.equal(got, ref), (got - ref).abs().max()
    assert (writers[0] / "v.mp4").read_bytes() == (single / "v.mp4").read_bytes()
