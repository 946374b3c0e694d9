"""Shared helpers of the test files (pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random gains and biases too, so a swapped or dropped norm gain or bias shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(p * (1 + 0.1 * torch.randn(p.shape, generator=g)))
    return model.eval().requires_grad_(False)


def run_in_triton_interpreter(code: str) -> str:
    """Run ``code`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton reads it at import, so a test
    process that imported triton cannot switch); assert it exits 0 and return its stdout."""
    pytest.importorskip("triton", reason="the test extra installs triton on Linux x86-64")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout
