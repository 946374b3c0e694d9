"""Sigma and timestep schedules of the official Wan2.2 text-to-video sampler.

Flow matching: ``x_sigma = (1 - sigma) * x0 + sigma * noise``; the DiT predicts ``v = noise - x0`` and gets
the integer timestep ``t = int(sigma * 1000)``. Every schedule here is computed exactly as the official code
does: in float64 numpy, timesteps truncated (not rounded) from the float64 sigmas, sigmas then cast to float32
with a terminal 0 appended.

- ``unipc`` (official default, ``FlowUniPCMultistepScheduler.set_timesteps(steps, shift=shift)``): the base
  is ``linspace(sigma_max, 0, steps + 1)[:-1]`` where ``sigma_max = float32(1 - 1/1000)`` (0.9990000128746033)
  is the first training sigma, so the first unshifted sigma is 0.999, never 1.
- ``dpm++`` (``get_sampling_sigmas``): the base is ``linspace(1, 0, steps + 1)[:steps]``, so the first sigma
  is exactly 1 and the first timestep is 1000 (not 999).
- ``euler`` (not in the official code): the ``unipc`` schedule, so Euler sees the same timesteps, boundary
  step and expert switch as the default solver.

Both then apply ``shift * s / (1 + (shift - 1) * s)``.

Differences found against Diffusers 0.42 (and why the tests pass explicit sigmas to the oracles):
- ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift).set_timesteps(steps)`` builds its base
  from ``linspace(1, 1/1000, steps + 1)[:-1]``, i.e. ``1 - 0.999 k / steps`` (and nudges a first sigma of 1 to
  ``1 - 1e-6``) instead of the official ``0.999 (1 - k / steps)``: a different schedule. Passing
  ``sigmas=<official shifted float64 sigmas>`` with ``flow_shift=1`` reproduces the official one exactly.
- ``DPMSolverMultistepScheduler(use_flow_sigmas=True)`` has no custom sigmas; its default flow schedule is
  ``flip(shift(1 - linspace(1, 1/1000, steps + 1)))[:-1]``, which equals the official *unipc* schedule up to
  float64 rounding (so its truncated timesteps can differ by one), not the official *dpm++* one that starts
  at sigma 1.
- Timesteps must be truncated from the float64 sigmas: truncating the float32 ones differs for many
  schedules (e.g. dpm++ 5 steps, shift 1: ``0.4 * 1000`` gives 400 in float64, 399 in float32).
"""

from __future__ import annotations

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
# The largest training sigma, as the official scheduler reads it: 1 - 1/1000 in float64, stored as float32.
SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The timestep shift ``shift * s / (1 + (shift - 1) * s)``, in float64 with the official operation order."""
    s = np.asarray(sigmas, dtype=np.float64)
    return shift * s / (1 + (shift - 1) * s)


def _with_terminal_zero(sigmas: np.ndarray, dtype: type[np.floating]) -> np.ndarray:
    return np.concatenate([sigmas, [0.0]]).astype(dtype)


def unipc_sigmas(steps: int, shift: float, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """Official UniPC sigmas ``[steps + 1]``, ending in 0. Pass ``dtype=np.float64`` for the exact values the
    official timesteps are truncated from."""
    _check_steps(steps)
    base = np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1]
    return _with_terminal_zero(shift_sigmas(base, shift), dtype)


def dpmpp_sigmas(steps: int, shift: float, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """Official DPM++ sigmas (``get_sampling_sigmas``) ``[steps + 1]``: starts at exactly 1, ends in 0."""
    _check_steps(steps)
    base = np.linspace(1.0, 0.0, steps + 1)[:steps]
    return _with_terminal_zero(shift_sigmas(base, shift), dtype)


def timesteps_from_sigmas(sigmas: np.ndarray) -> torch.Tensor:
    """int64 ``[steps]`` timesteps ``trunc(sigma * 1000)`` of float64 sigmas ``[steps + 1]`` (the terminal sigma
    gets no timestep). These are what the DiT gets and what the expert boundary is compared with."""
    if sigmas.dtype != np.float64:
        raise TypeError(f"timesteps are truncated from the float64 sigmas, got {sigmas.dtype}")
    return torch.from_numpy(sigmas[:-1] * NUM_TRAIN_TIMESTEPS).to(torch.int64)


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
