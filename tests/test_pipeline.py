"""The pipeline end to end on tiny random weights: layouts, the sampling loop, the Diffusers oracle, MP4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import diffusers_unipc

from wanfast import load_pipeline
from wanfast.config import ConfigError
from wanfast.pipeline import denoise
from wanfast.solvers import make_solver
from wanfast.specs import SPECS, resolve_params
from wanfast.video import read_mp4, write_mp4

GEN = dict(
    size=(64, 48), frames=9, steps=4, seed=3, shift=5.0, boundary=0.9
)  # timesteps [999, 937, 833, 624]


@pytest.fixture(scope="module")
def pipes(tiny_official, tiny_diffusers):
    return (
        load_pipeline(tiny_official, "cpu", torch.float32, torch.float32),
        load_pipeline(tiny_diffusers, "cpu", torch.float32, torch.float32),
    )


def test_same_weights_in_both_layouts_give_identical_latents(pipes):
    a, b = (p.generate("a red fox in the snow", **GEN) for p in pipes)
    assert a.latents.shape == (16, 3, 6, 8)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
    assert a.steps_per_expert == {"high_noise": 2, "low_noise": 2}
    assert a.frames.shape == (9, 48, 64, 3) and a.frames.dtype == torch.uint8
    assert a.latents.std() > 0.1 and torch.isfinite(a.latents).all()


class Recorder(torch.nn.Module):
    """A fake expert: records its inputs, returns a prediction that depends on x, t and the context."""

    def __init__(self, name: str, calls: list):
        super().__init__()
        self.name, self.calls = name, calls

    def forward(self, x, t, context):
        self.calls.append((self.name, x.clone(), float(t[0]), context[0].clone()))
        return 0.1 * x + 0.001 * t[:, None, None, None, None] + context[0].mean()


def _fake_experts(calls):
    return {"high_noise": Recorder("high_noise", calls), "low_noise": Recorder("low_noise", calls)}


def test_initial_noise_is_the_official_recipe(pipes):
    pipe = pipes[0]
    calls = []
    pipe.experts, real = _fake_experts(calls), pipe.experts
    try:
        pipe.generate("a cat", size=(64, 48), frames=9, steps=2, seed=1234)
    finally:
        pipe.experts = real
    g = torch.Generator("cpu").manual_seed(1234)
    expected = torch.randn(16, 3, 6, 8, dtype=torch.float32, generator=g)  # [16, (F-1)/4+1, H/8, W/8]
    assert torch.equal(calls[0][1][0], expected)


def test_expert_switch_and_guidance():
    calls = []
    steps, shift, boundary = 6, 5.0, 0.9
    p = resolve_params(
        SPECS["tiny"],
        "x",
        steps=steps,
        shift=shift,
        boundary=boundary,
        guidance_high_noise=4.0,
        guidance_low_noise=2.5,
    )
    cond, uncond = torch.ones(3, 2), torch.zeros(3, 2)
    noise = torch.randn(16, 2, 2, 2)
    out, counts = denoise(_fake_experts(calls), noise, [cond], [uncond], p)
    ts = make_solver("unipc", steps, shift).timesteps.tolist()
    expected_names = ["high_noise" if t >= boundary * 1000 else "low_noise" for t in ts]
    assert [c[0] for c in calls[::2]] == expected_names and [c[2] for c in calls[::2]] == ts
    assert counts == {
        "high_noise": expected_names.count("high_noise"),
        "low_noise": expected_names.count("low_noise"),
    }
    assert 0 < counts["high_noise"] < steps
    # each step: the conditional pass then the unconditional one, combined with that expert's scale
    assert all(torch.equal(c[3], cond) for c in calls[::2]) and all(
        torch.equal(c[3], uncond) for c in calls[1::2]
    )
    # replay the loop by hand with the official CFG formula
    solver, x, state = make_solver("unipc", steps, shift), noise, None
    state = solver.init_state()
    for i, (t, name) in enumerate(zip(ts, expected_names, strict=True)):
        scale = 4.0 if name == "high_noise" else 2.5
        pc = 0.1 * x + 0.001 * t + 1.0
        pu = 0.1 * x + 0.001 * t + 0.0
        x, state = solver.step(state, i, pu + scale * (pc - pu), x)
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)


def test_guidance_one_runs_a_single_pass():
    calls = []

    p = resolve_params(SPECS["tiny"], "x", steps=3, guidance_high_noise=1.0,
                                     guidance_low_noise=1.0)  # fmt: skip
    denoise(_fake_experts(calls), torch.randn(16, 1, 2, 2), [torch.ones(2, 2)], [torch.zeros(2, 2)], p)
    assert len(calls) == 3


def test_matches_diffusers_wan_pipeline(pipes, tiny_diffusers):
    """Same weights, noise and prompt embeddings through Diffusers' WanPipeline (the official sigmas
    injected into its UniPC scheduler, whose own flow schedule differs; see solvers/schedule.py)."""
    diffusers = pytest.importorskip("diffusers")
    ours = pipes[1]
    params = ours.params("a lighthouse at dusk", **GEN)
    res = ours.run(params)
    te = ours.text_encoder
    ctx, ctx_null = te.encode([params.prompt, params.negative_prompt])
    text_len = ours.experts["high_noise"].cfg.text_len

    def pad(e):
        return torch.cat([e, e.new_zeros(text_len - e.shape[0], e.shape[1])])[None]

    scheduler = diffusers_unipc(params.steps, params.shift)  # the official sigmas in Diffusers' UniPC
    ref_pipe = diffusers.WanPipeline(
        tokenizer=te.tokenizer,
        text_encoder=te.model,
        transformer=diffusers.WanTransformer3DModel.from_pretrained(tiny_diffusers / "transformer"),
        transformer_2=diffusers.WanTransformer3DModel.from_pretrained(tiny_diffusers / "transformer_2"),
        vae=diffusers.AutoencoderKLWan.from_pretrained(tiny_diffusers / "vae"),
        scheduler=scheduler,
        boundary_ratio=params.boundary,
    )
    noise = torch.randn(
        params.latent_shape(ours.vae.cfg), generator=torch.Generator("cpu").manual_seed(params.seed)
    )
    ref = ref_pipe(
        prompt_embeds=pad(ctx), negative_prompt_embeds=pad(ctx_null), height=params.height, width=params.width,
        num_frames=params.frames, num_inference_steps=params.steps, guidance_scale=params.guidance_high_noise,
        guidance_scale_2=params.guidance_low_noise, latents=noise[None], output_type="latent",
    ).frames[0]  # fmt: skip
    assert torch.equal(scheduler.timesteps, make_solver("unipc", params.steps, params.shift).timesteps)
    rel = (res.latents - ref).norm() / ref.norm()
    assert rel < 1e-5, f"relative error {rel:.2e} vs Diffusers WanPipeline"


def test_mp4_round_trip(tmp_path, pipes):
    res = pipes[0].generate("a boat", **GEN)
    frames, fps = read_mp4(write_mp4(res.frames, tmp_path / "out.mp4", fps=16))
    assert frames.shape == (9, 48, 64, 3) and fps == 16


def test_mp4_fidelity_on_a_smooth_video(tmp_path):
    """Random-weight output is noise, the worst case for H.264 4:2:0; a smooth moving gradient must
    come back close to what was written."""
    t, y, x = np.meshgrid(np.arange(9), np.arange(48), np.arange(64), indexing="ij")
    video = np.stack([(x * 4 + t * 8) % 256, y * 5, (x + y + t * 3) * 2 % 256], -1).astype(np.uint8)
    frames, _ = read_mp4(write_mp4(video, tmp_path / "smooth.mp4", fps=16))
    err = np.abs(frames.astype(np.float32) - video.astype(np.float32)).mean()
    assert err < 4, err


def test_bad_requests_fail_before_any_model_runs(pipes):
    pipe = pipes[0]
    calls = []
    pipe.experts, real = _fake_experts(calls), pipe.experts
    try:
        for kwargs, msg in [
            (dict(size=(100, 64)), "multiple of 16"),
            (dict(frames=10), "4n\\+1"),
            (dict(steps=0), ">= 1"),
            (dict(solver="ddim"), "unknown solver"),
            (dict(boundary=1.5), "boundary"),
        ]:
            with pytest.raises(ConfigError, match=msg):
                pipe.generate("a cat", **kwargs)
    finally:
        pipe.experts = real
    assert calls == []


def test_guidance_truncation_equals_the_plain_path_before_the_cut():

    base = resolve_params(SPECS["tiny"], "x", steps=6, boundary=0.5)
    noise = torch.randn(16, 2, 2, 2)
    runs = {}
    for k in (None, 3, 0):
        calls = []
        out, _ = denoise(
            _fake_experts(calls), noise, [torch.ones(3, 2)], [torch.zeros(3, 2)], base.with_(cfg_steps=k)
        )
        runs[k] = (calls, out)
    plain, cut, none = runs[None][0], runs[3][0], runs[0][0]
    assert len(plain) == 12 and len(cut) == 3 * 2 + 3 and len(none) == 6  # two passes per guided step
    # the same inputs through step 3 (steps 0-2 guided alike; step 3 starts from the same latents) ...
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain[:7], cut[:7], strict=True))
    # ... and from there on one conditional pass per step, so the results part
    assert all(torch.equal(c[3], torch.ones(3, 2)) for c in cut[6:])
    assert not torch.equal(runs[None][1], runs[3][1])
    with pytest.raises(ConfigError, match="cfg_steps"):
        base.with_(cfg_steps=-1)
