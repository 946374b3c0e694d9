"""Model specs, request resolution, checkpoint detection and image checks: the rules every entry point
shares, each decided in one place (``wanfast.specs``, ``wanfast.loading.layout``, ``wanfast.image``)."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
import torch
from PIL import Image

from wanfast.builder import plan
from wanfast.conditioning import best_output_size
from wanfast.config import DEFAULT_NEGATIVE_PROMPT, ConfigError, EngineSettings
from wanfast.image import MIN_SIDE, load_image
from wanfast.loading.layout import detect
from wanfast.specs import SPECS, family_spec, parse_size, resolve_params
from wanfast.tools.testing import write_diffusers_checkpoint, write_official_checkpoint


def test_size_multiple_comes_from_vae_stride_and_patch():
    assert SPECS["t2v-A14B"].size_multiple == 16 and SPECS["i2v-A14B"].size_multiple == 16
    assert SPECS["tiny"].size_multiple == 16


def test_resolve_params_rules():
    spec = SPECS["tiny"]
    p = resolve_params(spec, "a cat")
    d = spec.defaults
    assert (p.width, p.height, p.frames, p.steps) == (*d.size, d.frames, d.steps)
    assert p.negative_prompt == DEFAULT_NEGATIVE_PROMPT
    assert (
        resolve_params(spec, "x", negative_prompt="").negative_prompt == DEFAULT_NEGATIVE_PROMPT
    )  # official
    assert (
        resolve_params(spec, "x", size="32x48").width,
        resolve_params(spec, "x", size=(32, 48)).height,
    ) == (32, 48)
    g = resolve_params(spec, "x", guidance=2.0, guidance_low_noise=1.5)  # the named one wins
    assert (g.guidance_high_noise, g.guidance_low_noise) == (2.0, 1.5)
    with pytest.raises(ConfigError, match="multiple of 16 for tiny"):
        resolve_params(spec, "x", size="40x48")
    with pytest.raises(ConfigError, match="frames must be 4n"):
        resolve_params(spec, "x", frames=6)
    with pytest.raises(ConfigError, match="not both"):
        resolve_params(spec, "x", size="32x32", width=32)
    with pytest.raises(ConfigError, match="unknown sampling parameter"):
        resolve_params(spec, "x", bogus=1)


@pytest.mark.parametrize("text", ["١٢٨x٦٤", "128 x64", "128x", "x64", "1e3x64", "128x64x2", "-16x32"])
def test_size_parser_takes_ascii_digits_only(text):
    with pytest.raises(ConfigError, match="WIDTHxHEIGHT"):
        parse_size(text)


def test_image_rules_name_the_model():
    with pytest.raises(ConfigError, match="tiny takes no image"):
        resolve_params(SPECS["tiny"], "x", image_size=(64, 48))
    with pytest.raises(ConfigError, match="tiny-i2v needs an image"):
        resolve_params(SPECS["tiny-i2v"], "x")


def test_i2v_output_size_follows_the_image_aspect_ratio():
    # official: lat_h = round(sqrt(area * h / w) // 8 // 2 * 2); 1280x720 area, a 3:4 portrait 600x800
    p = resolve_params(SPECS["i2v-A14B"], "x", image_size=(600, 800))
    lat_h = round((1280 * 720 * 800 / 600) ** 0.5 // 8 // 2 * 2)
    lat_w = round((1280 * 720 * 600 / 800) ** 0.5 // 8 // 2 * 2)
    assert (p.width, p.height) == (lat_w * 8, lat_h * 8) == (816, 1104)
    assert p.width * p.height <= 1280 * 720


def test_an_extreme_aspect_ratio_is_a_clear_error():
    for name in ("ti2v-5B", "i2v-A14B"):
        with pytest.raises(ConfigError, match="too elongated"):
            resolve_params(SPECS[name], "x", image_size=(65536, 16))


def test_best_output_size():
    assert best_output_size(1280, 704, 32, 32, 1280 * 704) == (1280, 704)
    w, h = best_output_size(800, 600, 32, 32, 1280 * 704)  # 4:3 within the 1280x704 area
    assert (
        w % 32 == 0 and h % 32 == 0 and w * h <= 1280 * 704 and (w, h) == (1088, 800)
    )  # width-first: ratio 1.36 beats 1.40


def test_detect_official_and_diffusers(tmp_path):
    off = write_official_checkpoint(tmp_path / "o", SPECS["tiny"])
    dif = write_diffusers_checkpoint(tmp_path / "d", SPECS["tiny"])
    cfg = json.loads((off / "high_noise_model" / "config.json").read_text())
    assert "text_dim" not in cfg  # as published: the width comes from text_embedding.0.weight
    for folder in (off, dif):
        spec, paths = detect(folder)
        assert spec.name == "tiny" and spec.dit == SPECS["tiny"].dit and tuple(paths.experts) == spec.experts
        assert spec.dit.text_dim == 32


def test_detect_i2v_and_model_type_mismatch(tmp_path):
    off = write_official_checkpoint(tmp_path / "o", SPECS["tiny-i2v"])
    spec, _ = detect(off)
    assert spec.name == "tiny-i2v" and spec.conditioning == "concat" and spec.dit.in_dim == 36
    assert detect(write_diffusers_checkpoint(tmp_path / "d", SPECS["tiny-i2v"]))[0].name == "tiny-i2v"
    cfg_path = off / "low_noise_model" / "config.json"
    for sub in ("high_noise_model", "low_noise_model"):
        cfg = json.loads((off / sub / "config.json").read_text())
        (off / sub / "config.json").write_text(json.dumps({**cfg, "model_type": "t2v"}))
    with pytest.raises(ConfigError, match="model_type 't2v' but the weights are 'i2v'"):
        detect(off)
    assert cfg_path.exists()


def test_family_spec_refuses_unknown_channel_counts():
    dit = SPECS["tiny"].dit
    from dataclasses import replace

    with pytest.raises(ConfigError, match="no Wan2.2 model"):
        family_spec(replace(dit, in_dim=20), SPECS["tiny"].vae, 2)


def test_engine_settings_resolve_and_json_round_trip():
    s = EngineSettings(device="cpu", quant="fp8", ulysses=1).resolved()
    assert s.dtype == torch.float32 and s.vae_dtype == torch.float32
    assert EngineSettings.from_json(json.loads(json.dumps(s.to_json()))) == s
    assert EngineSettings().plain().optimize_vae is False  # --plain turns the VAE rewrite off too
    with pytest.raises(ConfigError, match="CUDA is not available"):
        if torch.cuda.is_available():
            raise ConfigError("CUDA is not available (skipping the CPU-only check on a GPU machine)")
        EngineSettings(device="cuda").resolved()


def test_unavailable_attention_backend_fails_at_plan_time():
    with pytest.raises(ConfigError, match="flash3"):
        plan("tiny", EngineSettings(device="cpu", attention_backend="flash3"))
    with pytest.raises(ConfigError):
        plan("tiny", EngineSettings(device="cpu", self_attention_backend="fa3-fp8"))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (the pixel data is a stub): a decompression bomb
    must be refused from its header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_load_image_checks(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 20, 30)).save(buf, "PNG")
    assert load_image(buf.getvalue()).size == (40, 30)
    with pytest.raises(ConfigError, match="not a readable image"):
        load_image(b"not an image at all")
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1)).save(tiny, "PNG")
    with pytest.raises(ConfigError, match=f"at least {MIN_SIDE} pixels"):
        load_image(tiny.getvalue())
    with pytest.raises(ConfigError, match="megapixels"):
        load_image(_png_header_only(100_000, 100_000))
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    t = torch.rand(3, 32, 48)
    assert load_image(t).size == (48, 32)
