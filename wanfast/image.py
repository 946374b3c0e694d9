"""The conditioning image of a request: read, checked, before any weights load.

Every entry point (CLI ``--image``, ``pipe.generate(image=...)``, the server's upload) goes through
``load_image``, so a file that is not an image, a 1x1 pixel or a decompression bomb fails the same way,
with a message that says what is allowed, before a model is touched.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from wanfast.config import ConfigError

MIN_SIDE = 16  # pixels: below one VAE stride per side there is nothing left to condition on
MAX_PIXELS = 8192 * 8192  # 64 MP: checked from the header, before the pixels are decoded
MAX_FILE_BYTES = 64 * 2**20


def _check_size(width: int, height: int, where: str) -> None:
    if min(width, height) < MIN_SIDE:
        raise ConfigError(f"{where} is {width}x{height}: each side must be at least {MIN_SIDE} pixels")
    if width * height > MAX_PIXELS:
        raise ConfigError(
            f"{where} is {width}x{height}: at most {MAX_PIXELS // 2**20} megapixels are accepted"
        )


def _from_tensor(t: torch.Tensor):
    """[3, H, W] uint8, or float in [0, 1] -> a PIL image (floats rounded to the nearest of 256 levels)."""
    from PIL import Image

    if t.ndim != 3 or t.shape[0] != 3:
        raise ConfigError(f"an image tensor must be [3, H, W], got {tuple(t.shape)}")
    if t.dtype != torch.uint8:
        if not t.is_floating_point():
            raise ConfigError(f"an image tensor must be uint8 or float in [0, 1], got {t.dtype}")
        t = (t.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(t.permute(1, 2, 0).cpu().numpy(), "RGB")


def load_image(source, where: str = "image"):
    """An RGB ``PIL.Image`` from a path, the bytes of an image file, a PIL image, or a [3, H, W] tensor
    (uint8, or float in [0, 1]). Raises ``ConfigError`` (``FileNotFoundError`` for a missing file) for
    anything undecodable, smaller than ``MIN_SIDE`` or larger than ``MAX_PIXELS``."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, torch.Tensor):
        img = _from_tensor(source)
        _check_size(*img.size, where)
        return img
    if isinstance(source, Image.Image):
        _check_size(*source.size, where)
        return source.convert("RGB")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{where} not found: {path}")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{where} {path} is over {MAX_FILE_BYTES // 2**20} MiB")
        data, where = path.read_bytes(), f"{where} {path}"
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        raise ConfigError(
            f"{where} must be a path, image bytes, a PIL image or a tensor, not {type(source).__name__}"
        )
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{where} is over {MAX_FILE_BYTES // 2**20} MiB")
    try:
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:  # PIL's own guard, from the header (twice its warning limit)
            raise ConfigError(
                f"{where} is too large: at most {MAX_PIXELS // 2**20} megapixels are accepted"
            ) from None
        _check_size(*img.size, where)  # from the header: a bomb is refused before it is decoded
        img.load()
    except ConfigError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ConfigError(f"{where} is not a readable image (PNG, JPEG, WebP, ...): {e}") from None
    return img.convert("RGB")
