"""Shared helpers of the test files (pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def random_dit(cfg, seed: int = 0):
    """A ``WanDiT`` with random weights everywhere (norm gains, biases and modulation tables too), so no
    parameter is trivially 0 or 1."""
    from wanfast.models.dit import WanDiT

    torch.manual_seed(seed)
    model = WanDiT(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias") or name.endswith("modulation"):
                p.normal_(0, 0.2)
    return model


def run_in_triton_interpreter(code: str) -> str:
    """Run ``code`` in a fresh Python with ``TRITON_INTERPRET=1`` (Triton reads it at import, so a test
    process that imported triton cannot switch); assert it exits 0 and return its stdout."""
    pytest.importorskip("triton", reason="the test extra installs triton on Linux x86-64")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def diffusers_unipc(steps: int, shift: float):
    """Diffusers' UniPC scheduler (the official solver settings) that runs the official sigmas of
    ``make_solver("unipc", steps, shift)``: its own flow schedule differs (see solvers/schedule.py), so the
    sigmas are injected into ``set_timesteps``. The Diffusers oracle tests' scheduler."""
    import diffusers

    from wanfast.solvers import make_solver

    solver = make_solver("unipc", steps, shift)
    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0, solver_order=2,
        predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
    )  # fmt: skip
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda n, device=None, **kw: set_timesteps(
        sigmas=solver.sigmas[:-1].double().numpy(), device=device
    )
    return scheduler


def prompt_embeds(pipe, params) -> dict[str, torch.Tensor]:
    """The request's two prompts encoded by ``pipe``'s text encoder and zero-padded to the DiT's text
    length [1, text_len, D], as Diffusers' ``prompt_embeds`` / ``negative_prompt_embeds`` arguments."""
    text_len = next(iter(pipe.experts.values())).cfg.text_len
    ctx, ctx_null = pipe.text_encoder.encode([params.prompt, params.negative_prompt])

    def pad(e: torch.Tensor) -> torch.Tensor:
        return torch.cat([e, e.new_zeros(text_len - e.shape[0], e.shape[1])])[None]

    return {"prompt_embeds": pad(ctx), "negative_prompt_embeds": pad(ctx_null)}


def sample_image(w: int = 97, h: int = 61):
    """A deterministic non-square RGB image: gradients plus noise, so a crop off by a pixel shows."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(0).integers(0, 60, size=(h, w, 3))
    rgb = np.stack([x * 255 // w, y * 255 // h, (x + y) * 3 % 256], -1) * 0.75 + noise
    from PIL import Image

    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def to_unit_range(img) -> torch.Tensor:
    """PIL RGB -> [3, H, W] in [-1, 1], as torchvision's ``to_tensor(img).sub(0.5).div(0.5)``."""
    a = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255
    return (a - 0.5) / 0.5
