"""I2V-A14B (tiny random weights, CPU, fp32): the concat conditioning and the two-expert loop against
Diffusers' ``WanImageToVideoPipeline``, the two checkpoint layouts, the official output size, and bad images
refused before any weights load (CLI and server).

Tolerance of the Diffusers comparisons: as in test_ti2v.py, the same fp32 weights through different
kernels differ by a few ulps per op (~1e-6 relative after CFG and 3 UniPC steps), while a defect (mask on
the wrong frame, channels in the wrong order, the wrong expert or guidance scale) moves the latents by
>1e-3; 1e-4 separates the two on any thread count or BLAS.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib

import pytest
import torch
import torch.nn.functional as F
from helpers import diffusers_unipc, prompt_embeds, rel_err, sample_image, to_unit_range

from wanfast import load_pipeline
from wanfast.conditioning import CONDITIONINGS
from wanfast.config import ConfigError
from wanfast.specs import SPECS
from wanfast.tools.testing import write_diffusers_checkpoint, write_official_checkpoint

SPEC = SPECS["tiny-i2v"]
TOL = 1e-4  # module docstring
# 97x61 at area 64*64: lat_h = round(sqrt(4096 * 61/97) // 8 // 2 * 2) = 6, lat_w = 10 -> 80x48
REQ = dict(size=(64, 64), frames=9, steps=3, seed=3, guidance_high_noise=4.0, guidance_low_noise=2.5)
OUT = (80, 48)  # (width, height) of the 97x61 sample image at REQ's area
# steps 3, shift 5: timesteps 999, 909 (>= boundary 900: high noise), 714 (low noise)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return (
        write_official_checkpoint(tmp_path_factory.mktemp("i2v-official"), SPEC, seed=5),
        write_diffusers_checkpoint(tmp_path_factory.mktemp("i2v-diffusers"), SPEC, seed=5),
    )


@pytest.fixture(scope="module")
def pipes(folders):
    return tuple(load_pipeline(f, "cpu", torch.float32, torch.float32) for f in folders)


def official_video_frame(img, size: tuple[int, int]) -> torch.Tensor:
    """The official ``WanI2V`` first frame: the [-1, 1] image stretched to ``size`` (width, height) by
    torch bicubic interpolation (align_corners False, no antialias, no clamp) -> [1, 3, H, W]."""
    w, h = size
    return F.interpolate(to_unit_range(img)[None], size=(h, w), mode="bicubic")


def reference_pipeline(ours, folder, params):
    """Diffusers' Wan2.2 I2V pipeline on the same weights: two experts split at the boundary, no CLIP
    image encoder (Wan2.2's I2V DiT has no image cross-attention), the official sigmas."""
    diffusers = pytest.importorskip("diffusers")
    return diffusers.WanImageToVideoPipeline(
        tokenizer=ours.text_encoder.tokenizer, text_encoder=ours.text_encoder.model,
        vae=diffusers.AutoencoderKLWan.from_pretrained(folder / "vae"),
        scheduler=diffusers_unipc(params.steps, params.shift),
        transformer=diffusers.WanTransformer3DModel.from_pretrained(folder / "transformer"),
        transformer_2=diffusers.WanTransformer3DModel.from_pretrained(folder / "transformer_2"),
        boundary_ratio=params.boundary,
    )  # fmt: skip


def _noise(pipe, params) -> torch.Tensor:
    return torch.randn(
        params.latent_shape(pipe.vae.cfg), generator=torch.Generator().manual_seed(params.seed)
    )


def test_condition_matches_diffusers_prepare_latents(pipes, folders):
    """Mask (4 channels, 1 on latent frame 0) | image latents of the image followed by F-1 zero frames.
    Diffusers' own resize (PIL LANCZOS stretch in ``video_processor.preprocess``) is not the official one
    (torch bicubic stretch): its ``prepare_latents`` is given the official stretched frame."""
    ours = pipes[1]
    img = sample_image()
    params = ours.params("a cat", image=img, **REQ)
    assert (params.width, params.height) == OUT
    cond = CONDITIONINGS[SPEC.conditioning].prepare(ours.spec, ours.vae, img, params, torch.device("cpu"))
    ref_pipe = reference_pipeline(ours, folders[1], params)
    _, ref = ref_pipe.prepare_latents(
        official_video_frame(img, OUT), 1, 16, params.height, params.width, params.frames, torch.float32,
        torch.device("cpu"), None, _noise(ours, params)[None],
    )  # fmt: skip
    ref = ref[0]
    assert cond.y.shape == ref.shape == (20, 3, 6, 10)  # [4 + 16, F', H/8, W/8]
    assert torch.equal(cond.y[:4], ref[:4])  # the mask: exact
    assert torch.all(cond.y[:4, 0] == 1) and torch.all(cond.y[:4, 1:] == 0)
    err = rel_err(cond.y[4:], ref[4:])
    print(f"I2V condition vs Diffusers prepare_latents: image latents rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.filterwarnings("ignore:Passing `image` as torch tensor with value range in \\[-1,1\\]")
def test_whole_loop_matches_diffusers_i2v_pipeline(pipes, folders):
    """Both experts (boundary 0.9, each its own guidance scale), the condition concatenated on the
    channels for both CFG passes. Diffusers gets the official stretched frame as a [-1, 1] tensor at the
    output size (its resize is then the identity and it skips its [0, 1] -> [-1, 1] mapping)."""
    ours = pipes[1]
    img = sample_image()
    params = ours.params("a sailing boat at sunset", image=img, **REQ)
    res = ours.run(params, image=img)
    assert res.steps_per_expert == {"high_noise": 2, "low_noise": 1}
    ref_pipe = reference_pipeline(ours, folders[1], params)
    ref = ref_pipe(
        image=official_video_frame(img, OUT), **prompt_embeds(ours, params), height=params.height,
        width=params.width, num_frames=params.frames, num_inference_steps=params.steps,
        guidance_scale=params.guidance_high_noise, guidance_scale_2=params.guidance_low_noise,
        latents=_noise(ours, params)[None], output_type="latent",
    ).frames[0]  # fmt: skip
    assert res.latents.shape == ref.shape == (16, 3, 6, 10)
    err = rel_err(res.latents, ref)
    print(f"I2V whole loop vs Diffusers WanImageToVideoPipeline: rel err {err:.2e}")
    assert err <= TOL, f"relative error {err:.2e} vs Diffusers WanImageToVideoPipeline"


def test_both_layouts_give_equal_latents(pipes):
    a, b = (p.generate("a lighthouse", image=sample_image(), **REQ) for p in pipes)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.frames, b.frames)
    assert a.frames.shape == (9, OUT[1], OUT[0], 3)
    assert a.latents.std() > 0.1 and torch.isfinite(a.latents).all()


@pytest.mark.parametrize(
    "image_size, area, expected",
    [
        ((97, 61), 64 * 64, (80, 48)),  # lat_h = 50.7 // 8 // 2 * 2 = 6, lat_w = 80.7 // 8 // 2 * 2 = 10
        # per side floored to the grid: 64x48, where TI2V's best_output_size would give 80x48
        ((120, 90), 64 * 64, (64, 48)),  # lat_h = 55.4 // 8 // 2 * 2 = 6, lat_w = 73.9 // 8 // 2 * 2 = 8
        ((90, 120), 64 * 64, (48, 64)),
        ((97, 61), 64 * 48, (64, 32)),  # lat_h = 43.9 -> 4, lat_w = 69.9 -> 8 (best_output_size: 64x48)
    ],
)
def test_output_size_is_the_official_one(pipes, image_size, area, expected):
    params = pipes[0].params("x", image=sample_image(*image_size), size=(area // 64, 64))
    assert (params.width, params.height) == expected


# -- bad images: refused before any weights load ----------------------------------------------------------
def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` RGB pixels, with no pixel data behind it: a decoder
    that trusted the header would allocate width * height * 3 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


BAD_IMAGES = [
    ("undecodable", lambda: b"this is not an image at all", r"not a readable image"),
    ("one_pixel", lambda: png(sample_image(1, 1)), r"1x1: each side must be at least 16 pixels"),
    # 9000 x 9000 = 81 MP: over our 64 MP cap, under PIL's own bomb limit (~179 MP): our header check
    ("huge_header", lambda: png_header(9000, 9000), r"9000x9000: at most 64 megapixels"),
    # 40000 x 40000: PIL refuses it at open (DecompressionBombError), reported as the same cap
    ("bomb_header", lambda: png_header(40000, 40000), r"too large: at most 64 megapixels"),
]


@pytest.mark.parametrize("name, data, message", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_cli_refuses_bad_images_before_loading(no_loading, tmp_path, capsys, name, data, message):
    from wanfast.cli import main

    path = tmp_path / f"{name}.png"
    path.write_bytes(data())
    argv = ["generate", "--model", "tiny-i2v", "--prompt", "a cat", "--device", "cpu", "--output",
            str(tmp_path / "out.mp4")]  # fmt: skip
    assert main([*argv, "--image", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert str(path) in err  # the message names the file
    assert not (tmp_path / "out.mp4").exists()


def test_cli_image_checks_are_what_stops_the_bad_images(no_loading, tmp_path, capsys):
    """The control for the test above: the same command with a good image, or with none, gets as far as
    it should (with a good image, to the build, which ``no_loading`` turns into an AssertionError)."""
    from wanfast.cli import main

    argv = ["generate", "--model", "tiny-i2v", "--prompt", "a cat", "--device", "cpu", "--output",
            str(tmp_path / "out.mp4")]  # fmt: skip
    good = tmp_path / "good.png"
    good.write_bytes(png(sample_image()))
    with pytest.raises(AssertionError, match="models were loaded"):
        main([*argv, "--image", str(good)])
    assert main(argv) == 2
    assert "needs an image" in capsys.readouterr().err


@pytest.mark.parametrize("name, data, message", BAD_IMAGES, ids=[b[0] for b in BAD_IMAGES])
def test_server_refuses_bad_images(name, data, message):
    pytest.importorskip("pydantic")
    from wanfast.server.schemas import VideoRequest, validate_request

    req = VideoRequest(prompt="a cat", image=base64.b64encode(data()).decode())
    with pytest.raises(ConfigError, match=message):
        validate_request(req, SPEC, 1000)


def test_server_takes_a_good_image_and_refuses_bad_base64():
    pytest.importorskip("pydantic")
    from wanfast.server.schemas import VideoRequest, validate_request

    raw = png(sample_image())
    stored, params, image = validate_request(
        VideoRequest(prompt="a cat", image=base64.b64encode(raw).decode(), size="64x64"), SPEC, 1000
    )
    assert image == raw and "image" not in stored and (params.width, params.height) == OUT
    with pytest.raises(ConfigError, match="base64"):
        validate_request(VideoRequest(prompt="a cat", image="not base64!"), SPEC, 1000)
    with pytest.raises(ConfigError, match="needs an image"):
        validate_request(VideoRequest(prompt="a cat"), SPEC, 1000)


def test_server_job_with_an_image_runs_and_hides_the_stored_path(tmp_path):
    """A tiny-i2v job submitted with a base64 image runs to the end through a real worker; the job's
    request shows the image by its content hash, not by where the server stored it."""
    import base64
    import io

    from wanfast.server.testing import ServerProcess, wait_final

    buf = io.BytesIO()
    sample_image(90, 60).save(buf, "PNG")
    body = {"prompt": "a cat", "image": base64.b64encode(buf.getvalue()).decode(), "steps": 2, "frames": 5}
    with (
        ServerProcess(tmp_path, "--model", "tiny-i2v", "--device", "cpu") as server,
        server.client() as client,
    ):
        r = client.post("/v1/videos", json=body)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["request"]["image"].startswith("sha256:") and str(tmp_path) not in str(job["request"])
        done = wait_final(client, job["id"], timeout=120)
    assert done["state"] == "succeeded", done
    assert (done["params"]["width"], done["params"]["height"]) == (64, 32)  # the 3:2 image in the 64x48 area
