"""Flow-matching Euler: ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v``.

Not in the official Wan2.2 code; it runs on the official UniPC schedule (``schedule.unipc_sigmas``), and
matches Diffusers' ``FlowMatchEulerDiscreteScheduler`` driven with those sigmas: the step size is a
float32 scalar, the update is done in float32 and cast back to the sample's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class EulerState(NamedTuple):
    """Euler keeps no history."""


def init_state() -> EulerState:
    return EulerState()


def step(
    sigmas: torch.Tensor, state: EulerState, i: int, model_output: torch.Tensor, sample: torch.Tensor
) -> tuple[torch.Tensor, EulerState]:
    """One Euler step ``i``. ``sigmas``: float32 ``[steps + 1]`` on the CPU. Returns (next sample, state)."""
    dt = float(sigmas[i + 1] - sigmas[i])
    return (sample.to(torch.float32) + dt * model_output).to(sample.dtype), state
