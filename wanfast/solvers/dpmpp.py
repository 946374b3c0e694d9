"""Multistep DPM-Solver++ (order 2, midpoint) for flow matching, as the official Wan2.2 ``dpm++`` sampler.

With ``alpha = 1 - sigma``, ``lambda = log(alpha) - log(sigma)``, ``h = lambda_t - lambda_s`` and the data
prediction ``x0 = sample - sigma * v``, one step ``sigmas[i] -> sigmas[i + 1]`` is

    x_t = (sigma_t / sigma_s) x - alpha_t (e^{-h} - 1) (D0 + D1 / 2),  D0 = x0_i,
    D1 = (x0_i - x0_{i-1}) / r,  r = (lambda_s - lambda_{s-1}) / h

with ``D1 = 0`` (first order) on the first and on the final step (the official ``final_sigmas_type="zero"``
forces it there). The official schedule starts at sigma 1 (lambda = -inf), so step 0 is exact DDIM and in
step 1 ``r = inf`` makes ``D1 = 0`` too; the float32 scalar arithmetic below reproduces that. The sample
is upcast to float32 for the update and cast back to its own dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class DPMState(NamedTuple):
    x0_prev: torch.Tensor | None = None  # the previous step's x0 prediction


def init_state() -> DPMState:
    return DPMState()


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


def step(
    sigmas: torch.Tensor, state: DPMState, i: int, model_output: torch.Tensor, sample: torch.Tensor
) -> tuple[torch.Tensor, DPMState]:
    """One DPM++ step ``i``. ``sigmas``: float32 ``[steps + 1]`` on the CPU. Returns (next sample, state)."""
    sigma_s, sigma_t = sigmas[i], sigmas[i + 1]
    x0 = sample - float(sigma_s) * model_output
    x = sample.to(torch.float32)
    lam_s = _lam(sigma_s)
    h = _lam(sigma_t) - lam_s
    coef = (1 - sigma_t) * (torch.exp(-h) - 1.0)  # alpha_t (e^{-h} - 1), float32
    out = float(sigma_t / sigma_s) * x - float(coef) * x0
    first_order = i == 0 or i == len(sigmas) - 2 or state.x0_prev is None
    if not first_order:
        inv_r = float(1.0 / ((lam_s - _lam(sigmas[i - 1])) / h))
        out = out - float(0.5 * coef) * (inv_r * (x0 - state.x0_prev))
    return out.to(sample.dtype), DPMState(x0_prev=x0)
