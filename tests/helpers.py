"""Shared helpers of the test files (pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch


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
