"""TI2V-5B (tiny random weights, CPU, fp32): the sampling loop in text and image mode against Diffusers, the
two checkpoint layouts, the official image preprocessing and the first-frame conditioning.

Tolerance of the Diffusers comparisons: both sides run the same weights in fp32 (unit roundoff 6e-8) but
different kernels (attention, RoPE, fused vs unfused linears, the VAE's convolutions), so each op differs
by a few ulps times sqrt(reduction length); CFG (scale 5) amplifies cond - uncond differences, and 3 UniPC
steps carry them on. That is ~1e-6 relative at the end (measured 5e-7 to 6e-7), while a real defect moves
the latents by >1e-3 even on these tiny random weights (measured: the first frame's tokens at t instead of
0: 1.9e-3; the image shifted by one source pixel: 2.2e-3; frame 0 not re-imposed: 1.0). 1e-4 sits between
the two, with margin on both sides on any thread count or BLAS.
"""

from __future__ import annotations

import pytest
import torch
from helpers import diffusers_unipc, prompt_embeds, rel_err, sample_image, to_unit_range
from PIL import Image

from wanfast import load_pipeline
from wanfast.conditioning import first_frame_pixels
from wanfast.models.dit import PerToken
from wanfast.solvers import make_solver
from wanfast.specs import SPECS
from wanfast.tools.testing import write_diffusers_checkpoint, write_official_checkpoint

SPEC = SPECS["tiny-ti2v"]
TOL = 1e-4  # module docstring
TEXT = dict(size=(64, 64), frames=5, steps=3, seed=3)  # latents [48, 2, 4, 4]
IMAGE = dict(size=(96, 64), frames=5, steps=3, seed=3)  # size: the maximum area (96 * 64)


def official_grid_size(iw: int, ih: int, grid: int, area: int) -> tuple[int, int]:
    """The official TI2V output size (``best_output_size`` in wan/utils/utils.py), restated: the float size
    of ``area`` at the image's aspect ratio, rounded to the grid width-first and height-first; of the two,
    the one whose aspect ratio is nearer (a tie goes to height-first)."""
    r = iw / ih
    fw = (area * r) ** 0.5
    fh = area / fw
    w1 = int(fw // grid * grid)
    cand1 = (w1, int(area / w1 // grid * grid))
    h2 = int(fh // grid * grid)
    cand2 = (int(area / h2 // grid * grid), h2)

    def off(c: tuple[int, int]) -> float:
        return max(r / (c[0] / c[1]), (c[0] / c[1]) / r)

    return cand1 if off(cand1) < off(cand2) else cand2


def official_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The official ``WanTI2V.i2v`` steps with PIL: scale by the larger factor (LANCZOS, sides rounded),
    then the centre ``size`` (width, height) box, the left/top offset rounded down."""
    ow, oh = size
    s = max(ow / img.width, oh / img.height)
    big = img.resize((round(img.width * s), round(img.height * s)), Image.LANCZOS)
    left, top = (big.width - ow) // 2, (big.height - oh) // 2
    out = big.crop((left, top, left + ow, top + oh))
    assert out.size == (ow, oh)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return (
        write_official_checkpoint(tmp_path_factory.mktemp("ti2v-official"), SPEC, seed=5),
        write_diffusers_checkpoint(tmp_path_factory.mktemp("ti2v-diffusers"), SPEC, seed=5),
    )


@pytest.fixture(scope="module")
def pipes(folders):
    return tuple(load_pipeline(f, "cpu", torch.float32, torch.float32) for f in folders)


def _diffusers_parts(folder):
    diffusers = pytest.importorskip("diffusers")
    return (
        diffusers,
        diffusers.WanTransformer3DModel.from_pretrained(folder / "transformer"),
        diffusers.AutoencoderKLWan.from_pretrained(folder / "vae"),
    )


def test_text_mode_matches_diffusers_wan_pipeline(pipes, folders):
    """Without an image TI2V-5B is a one-DiT T2V model with per-token timesteps, all equal (Diffusers:
    ``WanPipeline(expand_timesteps=True)``; ours passes the one value [1], the same embedding per token)."""
    ours = pipes[1]
    diffusers, transformer, vae = _diffusers_parts(folders[1])
    params = ours.params("a lighthouse at dusk", **TEXT)
    res = ours.run(params)
    ref_pipe = diffusers.WanPipeline(
        tokenizer=ours.text_encoder.tokenizer, text_encoder=ours.text_encoder.model, vae=vae,
        scheduler=diffusers_unipc(params.steps, params.shift), transformer=transformer, expand_timesteps=True,
    )  # fmt: skip
    noise = torch.randn(
        params.latent_shape(ours.vae.cfg), generator=torch.Generator().manual_seed(params.seed)
    )
    ref = ref_pipe(
        **prompt_embeds(ours, params), height=params.height, width=params.width, num_frames=params.frames,
        num_inference_steps=params.steps, guidance_scale=params.guidance_high_noise, latents=noise[None],
        output_type="latent",
    ).frames[0]  # fmt: skip
    assert res.latents.shape == (48, 2, 4, 4) == ref.shape
    err = rel_err(res.latents, ref)
    print(f"TI2V text mode vs Diffusers WanPipeline: rel err {err:.2e}")
    assert err <= TOL, f"relative error {err:.2e} vs Diffusers WanPipeline(expand_timesteps=True)"


def test_image_mode_matches_diffusers_i2v_pipeline(pipes, folders):
    """Image mode against ``WanImageToVideoPipeline(expand_timesteps=True)`` (Diffusers' Wan2.2 TI2V).

    Two differences from the official ``WanTI2V.i2v``, both handled so that the comparable parts are
    compared: (1) Diffusers stretches the image to the output size with LANCZOS, the official code resizes
    by the larger scale and centre-crops: Diffusers is given the official crop, at the output size, where
    its resize is the identity; (2) Diffusers imposes the image latent on the DiT input and on the final
    latents only, the official loop also on the solver's latents after every step: UniPC updates every
    element on its own, so frames 1.. evolve identically and frame 0 ends as the image latent in both."""
    ours = pipes[1]
    diffusers, transformer, vae = _diffusers_parts(folders[1])
    img = sample_image()
    params = ours.params("a red kite over the sea", image=img, **IMAGE)
    assert (params.width, params.height) == (96, 64)
    res = ours.run(params, image=img)
    ref_pipe = diffusers.WanImageToVideoPipeline(
        tokenizer=ours.text_encoder.tokenizer, text_encoder=ours.text_encoder.model, vae=vae,
        scheduler=diffusers_unipc(params.steps, params.shift), transformer=transformer, expand_timesteps=True,
    )  # fmt: skip
    noise = torch.randn(
        params.latent_shape(ours.vae.cfg), generator=torch.Generator().manual_seed(params.seed)
    )
    ref = ref_pipe(
        image=official_crop(img, (96, 64)), **prompt_embeds(ours, params), height=params.height,
        width=params.width, num_frames=params.frames, num_inference_steps=params.steps,
        guidance_scale=params.guidance_high_noise, latents=noise[None], output_type="latent",
    ).frames[0]  # fmt: skip
    assert res.latents.shape == (48, 2, 4, 6) == ref.shape
    err0, err = rel_err(res.latents[:, :1], ref[:, :1]), rel_err(res.latents, ref)
    print(f"TI2V image mode vs Diffusers WanImageToVideoPipeline: frame 0 {err0:.2e}, all {err:.2e}")
    assert err0 <= TOL, f"the image latents differ: {err0:.2e}"
    assert err <= TOL, f"relative error {err:.2e} vs Diffusers WanImageToVideoPipeline(expand_timesteps=True)"


def test_both_layouts_give_equal_latents(pipes):
    """Same weights, same code once loaded: bit-identical in text and in image mode."""
    for image in (None, sample_image()):
        a, b = (p.generate("a boat on a lake", image=image, **TEXT) for p in pipes)
        assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
        assert a.latents.std() > 0.1 and torch.isfinite(a.latents).all()


@pytest.mark.parametrize(
    "image_size, area, expected",
    [
        # 97x61 at area 64*64: width-first (64, 64), height-first (128, 32); ratios off by 1.59 and 2.52
        ((97, 61), 64 * 64, (64, 64)),
        # at area 96*64: width-first (96, 64), off by 1.06; height-first (192, 32), off by 3.77
        ((97, 61), 96 * 64, (96, 64)),
        ((50, 131), 64 * 128, (64, 128)),  # portrait: width-first (64, 128), height-first (32, 224)
    ],
)
def test_preprocessing_is_the_official_resize_and_crop(pipes, image_size, area, expected):
    img = sample_image(*image_size)
    size = official_grid_size(*image_size, SPEC.size_multiple, area)
    assert size == expected
    params = pipes[0].params("x", image=img, size=(area // 64, 64))
    assert (params.width, params.height) == size
    ours = first_frame_pixels(img, size)
    assert ours.shape == (3, 1, size[1], size[0])
    assert torch.equal(ours[:, 0], to_unit_range(official_crop(img, size)))


class Recorder(torch.nn.Module):
    """Wraps the DiT: records every call's input and per-token timesteps (dense [B, L])."""

    def __init__(self, dit: torch.nn.Module):
        super().__init__()
        self.dit, self.calls, self.cfg = dit, [], dit.cfg

    def forward(self, x, t, context):
        dense = t.table[t.index] if isinstance(t, PerToken) else t.reshape(-1, 1)
        self.calls.append((x.clone(), dense.clone()))
        return self.dit(x, t, context)


def test_first_frame_tokens_get_timestep_zero_and_keep_the_image_latent(pipes):
    pipe = pipes[0]
    img = sample_image()
    params = pipe.params("a kite", image=img, **IMAGE)
    rec = Recorder(pipe.experts["dit"])
    pipe.experts["dit"] = rec
    try:
        res = pipe.run(params, image=img)
    finally:
        pipe.experts["dit"] = rec.dit
    z = pipe.vae.encode(first_frame_pixels(img, (96, 64))[None])[0]  # [48, 1, 4, 6]
    _, f, h, w = res.latents.shape
    per_frame = (h // 2) * (w // 2)  # tokens per latent frame: patch (1, 2, 2)
    ts = make_solver(params.solver, params.steps, params.shift).timesteps.tolist()
    assert len(rec.calls) == 2 * params.steps  # CFG: conditional and unconditional pass per step
    for i, (x, t) in enumerate(rec.calls):
        assert t.shape == (1, f * per_frame)
        # official: (mask [F', h, w] with frame 0 zero)[:, ::2, ::2] * t, flattened
        assert torch.all(t[:, :per_frame] == 0) and torch.all(t[:, per_frame:] == ts[i // 2])
        assert torch.equal(x[0, :, :1], z)  # the DiT always sees the image as frame 0
    assert torch.equal(res.latents[:, :1], z)
    assert (res.latents[:, 1:] - z).abs().mean() > 0.1  # later frames are generated, not copies
