"""Solver schedules and steps vs the official Wan2.2 formulas and the Diffusers schedulers as oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wanfast.solvers import make_solver
from wanfast.solvers.schedule import (
    SIGMA_MAX,
    dpmpp_sigmas,
    shift_sigmas,
    timesteps_from_sigmas,
    unipc_sigmas,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # from inside Diffusers


def _diffusers():
    return pytest.importorskip("diffusers")  # only the oracle tests need it


SOLVER_NAMES = ("unipc", "dpm++", "euler")
CASES = [(1, 5.0), (2, 12.0), (5, 1.0), (12, 5.0), (40, 12.0)]


# --- (a) schedules --------------------------------------------------------------------------------


def test_sigma_max_is_the_first_training_sigma() -> None:
    # The official scheduler: sigmas = 1 - linspace(1, 1/1000, 1000)[::-1], as float32; sigma_max = sigmas[0].
    train = torch.from_numpy(1.0 - np.linspace(1, 1 / 1000, 1000)[::-1].copy()).to(torch.float32)
    assert SIGMA_MAX == train[0].item() == 0.9990000128746033
    assert train[-1].item() == 0.0


@pytest.mark.parametrize(
    ("steps", "shift", "sigmas", "timesteps"),
    [
        (1, 1.0, [0.999, 0.0], [999]),
        (2, 1.0, [0.999, 0.4995, 0.0], [999, 499]),
        # 5 * 0.999 / (1 + 4 * 0.999), 5 * 0.4995 / (1 + 4 * 0.4995)
        (2, 5.0, [4.995 / 4.996, 2.4975 / 2.998, 0.0], [999, 833]),
        (
            4,
            3.0,
            [2.997 / 2.998, 2.24775 / 2.4985, 1.4985 / 1.999, 0.74925 / 1.4995, 0.0],
            [999, 899, 749, 499],
        ),
    ],
)
def test_unipc_schedule_hand_values(
    steps: int, shift: float, sigmas: list[float], timesteps: list[int]
) -> None:
    got = unipc_sigmas(steps, shift)
    assert got.dtype == np.float32 and got.shape == (steps + 1,) and got[-1] == 0.0
    np.testing.assert_allclose(got, sigmas, rtol=1e-6)
    assert timesteps_from_sigmas(unipc_sigmas(steps, shift, np.float64)).tolist() == timesteps


@pytest.mark.parametrize(
    ("steps", "shift", "sigmas", "timesteps"),
    [
        (1, 5.0, [1.0, 0.0], [1000]),
        (2, 5.0, [1.0, 2.5 / 3.0, 0.0], [1000, 833]),
        (4, 3.0, [1.0, 0.9, 0.75, 0.5, 0.0], [1000, 900, 750, 500]),
        # float64 linspace gives 0.3999999999999999 and 0.19999999999999996: truncated to 399 and 199.
        (5, 1.0, [1.0, 0.8, 0.6, 0.4, 0.2, 0.0], [1000, 800, 600, 399, 199]),
    ],
)
def test_dpmpp_schedule_hand_values(
    steps: int, shift: float, sigmas: list[float], timesteps: list[int]
) -> None:
    got = dpmpp_sigmas(steps, shift)
    assert got.dtype == np.float32 and got.shape == (steps + 1,)
    np.testing.assert_allclose(got, sigmas, rtol=1e-6)
    assert timesteps_from_sigmas(dpmpp_sigmas(steps, shift, np.float64)).tolist() == timesteps


def test_wan22_a14b_default_timesteps() -> None:
    # Official t2v-A14B defaults: unipc, 40 steps, shift 12 (boundary 875 -> the first 26 steps are high noise).
    t = make_solver("unipc", 40, 12.0).timesteps
    assert t.dtype == torch.int64
    assert t.tolist() == [
        999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947, 941, 936, 929,
        922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678, 631, 571, 492, 386, 235,
    ]  # fmt: skip
    assert int((t >= 875).sum()) == 26


@pytest.mark.parametrize("steps", [1, 2, 3, 17, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 12.0])
def test_schedules_follow_official_formula(steps: int, shift: float) -> None:
    # Re-derived inline from the official set_timesteps / get_sampling_sigmas.
    for base, name in (
        (np.linspace(SIGMA_MAX, 0, steps + 1)[:-1], "unipc"),
        (np.linspace(1, 0, steps + 1)[:steps], "dpm++"),
    ):
        s = shift * base / (1 + (shift - 1) * base)
        solver = make_solver(name, steps, shift)
        assert torch.equal(solver.timesteps, torch.from_numpy(s * 1000).to(torch.int64))
        assert torch.equal(solver.sigmas, torch.from_numpy(np.concatenate([s, [0]]).astype(np.float32)))
    euler = make_solver("euler", steps, shift)
    unipc = make_solver("unipc", steps, shift)
    assert torch.equal(euler.sigmas, unipc.sigmas) and torch.equal(euler.timesteps, unipc.timesteps)


def test_shift_sigmas_fixed_points() -> None:
    np.testing.assert_array_equal(shift_sigmas(np.array([0.0, 0.3, 1.0]), 1.0), [0.0, 0.3, 1.0])
    np.testing.assert_allclose(shift_sigmas(np.array([0.0, 0.5, 1.0]), 3.0), [0.0, 0.75, 1.0])


def test_schedule_errors() -> None:
    with pytest.raises(TypeError):
        timesteps_from_sigmas(unipc_sigmas(4, 5.0))  # float32 sigmas truncate differently
    with pytest.raises(ValueError):
        unipc_sigmas(0, 5.0)
    with pytest.raises(ValueError):
        make_solver("ddim", 10, 5.0)
    with pytest.raises(IndexError):
        solver = make_solver("unipc", 3, 5.0)
        solver.step(solver.init_state(), 3, torch.zeros(2), torch.zeros(2))


def test_diffusers_default_flow_schedules_differ_from_official() -> None:
    # Documented in schedule.py: Diffusers' own UniPC flow schedule is 1 - 0.999 k / n (first sigma 1 - 1e-6).
    diffusers, steps, shift = _diffusers(), 5, 5.0
    ref = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
    )
    ref.set_timesteps(steps)
    theirs = shift_sigmas(np.linspace(1, 1 / 1000, steps + 1)[:-1], shift)
    theirs[0] -= 1e-6
    np.testing.assert_allclose(ref.sigmas[:-1].numpy(), theirs, rtol=1e-6)
    assert not np.allclose(ref.sigmas.numpy(), unipc_sigmas(steps, shift), atol=1e-3)
    # Diffusers' DPM++ flow schedule is the official *unipc* one (up to float64 rounding), not the dpm++ one.
    dpm = diffusers.DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift
    )
    dpm.set_timesteps(steps)
    np.testing.assert_allclose(dpm.sigmas.numpy(), unipc_sigmas(steps, shift), atol=1e-6)
    assert dpm.sigmas[0] < 1.0 == dpmpp_sigmas(steps, shift)[0]


# --- (b) steps vs the Diffusers oracles -------------------------------------------------------------


def _fake_model(c: torch.Tensor):
    def model(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return torch.tanh(x) * (0.5 + sigma) - 0.3 * torch.sin(2 * x) + sigma * sigma * c

    return model


def _oracle(name: str, steps: int, shift: float):
    diffusers, solver = _diffusers(), make_solver(name, steps, shift)
    if name == "unipc":
        ref = diffusers.UniPCMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=1.0,
            solver_order=2,
            predict_x0=True,
            solver_type="bh2",
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        # The official (already shifted) float64 sigmas; flow_shift=1 so Diffusers does not shift them again.
        ref.set_timesteps(sigmas=unipc_sigmas(steps, shift, np.float64)[:-1])
        assert torch.equal(ref.timesteps, solver.timesteps)
    elif name == "dpm++":
        ref = diffusers.DPMSolverMultistepScheduler(
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=shift,
            solver_order=2,
            algorithm_type="dpmsolver++",
            solver_type="midpoint",
            lower_order_final=True,
            final_sigmas_type="zero",
        )
        ref.set_timesteps(steps)
        ref.sigmas, ref.timesteps = solver.sigmas.clone(), solver.timesteps.clone()  # no custom-sigmas API
    else:
        ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0)
        ref.set_timesteps(sigmas=solver.sigmas[:-1].numpy())
    assert torch.equal(ref.sigmas, solver.sigmas)
    ref.set_begin_index(0)
    return solver, ref


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize(("steps", "shift"), CASES)
def test_matches_diffusers_oracle(name: str, steps: int, shift: float) -> None:
    gen = torch.Generator().manual_seed(steps)
    x_init, c = torch.randn(2, 1, 4, 2, 3, 3, generator=gen)
    model = _fake_model(c)
    solver, ref = _oracle(name, steps, shift)
    x, y, state = x_init.clone(), x_init.clone(), solver.init_state()
    for i, t in enumerate(ref.timesteps):
        sigma = float(solver.sigmas[i])
        x, state = solver.step(state, i, model(x, sigma), x)
        y = ref.step(model(y, sigma), t, y, return_dict=False)[0]
        assert x.dtype == torch.float32
        assert ((x - y).norm() / y.norm()).item() <= 1e-5, f"step {i}"


# --- (c) fixed reference sequences -------------------------------------------------------------------

# Final samples of 5 steps, shift 5, from the start and model below; computed once and cross-checked
# against the Diffusers oracles (identical to float32 precision).
REFERENCE = {
    "unipc": [0.16938284, -0.39788321, 0.62160116, 0.037458383],
    "dpm++": [0.16424577, -0.38712209, 0.60826826, 0.036480412],
    "euler": [0.14739209, -0.35088092, 0.56180018, 0.033280365],
}


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_reference_sequence(name: str) -> None:
    model = _fake_model(torch.tensor([0.3, -0.7, 1.1, 0.05]))
    solver = make_solver(name, 5, 5.0)
    x, state = torch.tensor([0.5, -1.2, 2.0, 0.1]), solver.init_state()
    for i in range(solver.steps):
        x, state = solver.step(state, i, model(x, float(solver.sigmas[i])), x)
    np.testing.assert_allclose(x.numpy(), REFERENCE[name], rtol=2e-6, atol=1e-7)


# --- (d) solver-agnostic sanity ----------------------------------------------------------------------


@pytest.mark.parametrize("name", SOLVER_NAMES)
@pytest.mark.parametrize(("steps", "shift"), CASES)
def test_linear_flow_recovers_x0(name: str, steps: int, shift: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 5, generator=gen)
    solver = make_solver(name, steps, shift)
    s0 = float(solver.sigmas[0])
    x, state = (1 - s0) * x0 + s0 * noise, solver.init_state()
    for i in range(steps):
        x, state = solver.step(state, i, noise - x0, x)
        s = float(solver.sigmas[i + 1])
        torch.testing.assert_close(x, (1 - s) * x0 + s * noise, rtol=0, atol=1e-5)  # stays on the line
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_step_is_pure_and_keeps_dtype(name: str) -> None:
    solver = make_solver(name, 4, 5.0)
    gen = torch.Generator().manual_seed(1)
    sample, v = torch.randn(2, 8, generator=gen)
    model_out = v.to(torch.bfloat16)
    state = solver.init_state()
    for i in range(3):
        snap = (sample.clone(), model_out.clone(), state)
        out1, state1 = solver.step(state, i, model_out, sample)
        out2, state2 = solver.step(state, i, model_out, sample)
        assert torch.equal(out1, out2) and out1.dtype == torch.float32
        assert torch.equal(sample, snap[0]) and torch.equal(model_out, snap[1]) and state is snap[2]
        assert type(state1) is type(state) and len(state1) == len(state2)
        sample, state = out1, state1
