"""Sampling solvers of the Wan2.2 text-to-video pipeline: ``unipc`` (official default), ``dpm++``, ``euler``.

The loop-facing API::

    solver = make_solver("unipc", steps, shift)
    state = solver.init_state()
    for i, t in enumerate(solver.timesteps.tolist()):  # int64 timesteps for the DiT and the boundary test
        v = dit(sample, t)  # flow prediction (noise - x0)
        sample, state = solver.step(state, i, v, sample)

Each step is a pure function of (schedule, state, i, model output, sample): it never mutates its inputs
and returns a new immutable state. Steps run on the sample's device and keep its dtype; schedule scalars
are plain Python floats computed on the CPU, so a step needs no host sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from wanfast.solvers import dpmpp, euler, unipc
from wanfast.solvers.schedule import dpmpp_sigmas, timesteps_from_sigmas, unipc_sigmas

SolverState = unipc.UniPCState | dpmpp.DPMState | euler.EulerState
StepFn = Callable[..., tuple[torch.Tensor, SolverState]]

# name -> (float64 sigma schedule, init_state, step)
_SOLVERS: dict[str, tuple[Callable[..., np.ndarray], Callable[[], SolverState], StepFn]] = {
    "unipc": (unipc_sigmas, unipc.init_state, unipc.step),
    "dpm++": (dpmpp_sigmas, dpmpp.init_state, dpmpp.step),
    "euler": (unipc_sigmas, euler.init_state, euler.step),
}


@dataclass(frozen=True)
class Solver:
    name: str
    timesteps: torch.Tensor  # int64 [steps] on the CPU: what the DiT gets and the boundary test uses
    sigmas: torch.Tensor  # float32 [steps + 1] on the CPU, ending in 0

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def init_state(self) -> SolverState:
        return _SOLVERS[self.name][1]()

    def step(
        self, state: SolverState, i: int, model_output: torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, SolverState]:
        """Step ``i`` (from ``sigmas[i]`` to ``sigmas[i + 1]``): returns (next sample, next state)."""
        if not 0 <= i < self.steps:
            raise IndexError(f"step {i} out of range for {self.steps} steps")
        return _SOLVERS[self.name][2](self.sigmas, state, i, model_output, sample)


def make_solver(name: str, steps: int, shift: float) -> Solver:
    """The solver ``name`` ("unipc", "dpm++" or "euler") on its official schedule."""
    if name not in _SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(_SOLVERS)}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    sigmas = _SOLVERS[name][0](steps, shift, dtype=np.float64)
    return Solver(name, timesteps_from_sigmas(sigmas), torch.from_numpy(sigmas.astype(np.float32)))


__all__ = ["Solver", "SolverState", "make_solver"]
