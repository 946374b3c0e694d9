"""UniPC (order 2, B(h) = expm1, data prediction) for flow matching, as the official Wan2.2 default sampler.

Flow matching gives ``alpha = 1 - sigma`` and the log-SNR ``lambda = log(alpha) - log(sigma)``; the data
prediction is ``x0 = sample - sigma * v``. One step ``i`` (sigma ``s_i -> s_{i+1}``):

1. ``x0_i`` from the incoming (predicted, uncorrected) sample.
2. UniC corrector, on every step but the first: the previous predictor is redone from the sample it
   started at, now also using ``x0_i - x0_{i-1}`` (the model output at its result), with the previous
   step's order. Its weights solve ``R rho = b`` (order 1: ``rho = 1/2``).
3. UniP predictor from the corrected sample to ``s_{i+1}``, order ``min(2, i + 1, steps - i)`` (warm-up and
   lower order on the final step); order 2 adds ``rho = 1/2`` times the divided difference of ``x0``.

``x0_i`` stays the one from the uncorrected sample (the model was evaluated there); the corrected sample
is what the next corrector restarts from. The last step lands on sigma 0, where the update is ``x0``.
Schedule coefficients are float32 scalars computed from the float32 sigmas, like the official scheduler;
the tensor work stays on the sample's device and dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

ORDER = 2


class UniPCState(NamedTuple):
    last_sample: torch.Tensor | None = None  # the sample the previous predictor started from (corrected)
    x0s: tuple[torch.Tensor, ...] = ()  # x0 predictions of the previous steps, oldest first, at most ORDER


def init_state() -> UniPCState:
    return UniPCState()


def step_order(i: int, steps: int) -> int:
    """Predictor order of step ``i``: warm-up on the first step, lower order on the final one."""
    return min(ORDER, i + 1, steps - i)


def _lam(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


class _Update(NamedTuple):
    """Float32 scalars of the update ``sigmas[s] -> sigmas[s + 1]`` (h = lambda_t - lambda_s)."""

    ratio: float  # sigma_t / sigma_s
    coef: float  # alpha_t * B(h), B(h) = expm1(-h) = h * phi_1(-h) (bh2)
    r1: float  # (lambda_{s-1} - lambda_s) / h, order 2 only
    b: torch.Tensor  # right-hand side [b_1 .. b_order] of the UniC system


def _update(sigmas: torch.Tensor, s: int, order: int) -> _Update:
    sigma_t, sigma_s = sigmas[s + 1], sigmas[s]
    lam_s = _lam(sigma_s)
    h = _lam(sigma_t) - lam_s
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b, factorial = [], 1
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / h_phi_1)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r1 = float((_lam(sigmas[s - 1]) - lam_s) / h) if order > 1 else 1.0
    return _Update(float(sigma_t / sigma_s), float((1 - sigma_t) * h_phi_1), r1, torch.stack(b))


def predictor(
    sigmas: torch.Tensor, x0s: tuple[torch.Tensor, ...], i: int, sample: torch.Tensor
) -> torch.Tensor:
    """UniP from ``sample`` at ``sigmas[i]`` to ``sigmas[i + 1]``; ``x0s`` ends with ``x0_i``."""
    order = step_order(i, len(sigmas) - 1)
    u = _update(sigmas, i, order)
    out = u.ratio * sample - u.coef * x0s[-1]
    if order == 2:
        out = out - u.coef * (0.5 * ((x0s[-2] - x0s[-1]) / u.r1))
    return out.to(sample.dtype)


def corrector(
    sigmas: torch.Tensor, state: UniPCState, i: int, x0_i: torch.Tensor, sample: torch.Tensor
) -> torch.Tensor:
    """UniC: redo step ``i - 1`` from ``state.last_sample`` with ``x0_i`` too; returns the corrected sample."""
    order = step_order(i - 1, len(sigmas) - 1)
    u = _update(sigmas, i - 1, order)
    x0s = state.x0s
    out = u.ratio * state.last_sample - u.coef * x0s[-1]
    d_t = x0_i - x0s[-1]
    if order == 1:
        res = 0.5 * d_t
    else:
        rho = torch.linalg.solve(torch.tensor([[1.0, 1.0], [u.r1, 1.0]]), u.b).tolist()
        res = rho[0] * ((x0s[-2] - x0s[-1]) / u.r1) + rho[1] * d_t
    return (out - u.coef * res).to(sample.dtype)


def step(
    sigmas: torch.Tensor, state: UniPCState, i: int, model_output: torch.Tensor, sample: torch.Tensor
) -> tuple[torch.Tensor, UniPCState]:
    """One UniPC step ``i``. ``sigmas``: float32 ``[steps + 1]`` on the CPU. Returns (next sample, state)."""
    x0 = sample - float(sigmas[i]) * model_output
    if i > 0 and state.last_sample is not None:
        sample = corrector(sigmas, state, i, x0, sample)
    x0s = (*state.x0s, x0)[-ORDER:]
    return predictor(sigmas, x0s, i, sample), UniPCState(last_sample=sample, x0s=x0s)
