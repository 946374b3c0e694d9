"""How a request's image (if any) enters the DiT: one ``Conditioning`` per kind, named by the model spec.

- ``text`` (T2V-A14B; TI2V-5B without an image): nothing; one timestep per sample.
- ``first_frame`` (TI2V-5B with an image, official ``WanTI2V.i2v``): the output size is the best size on
  the model's pixel grid for the image's aspect ratio within the requested area (``best_output_size``);
  the image is resized with LANCZOS by the larger scale factor (rounded), center-cropped, encoded into the
  first latent frame, which replaces frame 0 of the noise before the loop and after every solver step;
  the timestep is per token, 0 on the first frame's tokens.
- ``concat`` (I2V-A14B, official ``WanI2V``): latent size from the aspect ratio within the area,
  ``lat = round(sqrt(area * h / w) // stride // patch * patch)`` per side; the [-1, 1] image stretched to
  that size by bicubic interpolation (torch, fp32 on the CPU, no antialias, no clamp), followed by F-1
  zero frames, encoded; a 4-channel mask, 1 at latent frame 0 and 0 after; the DiT input is the channel
  concat noise | mask | image latents, the same for both CFG passes; one timestep per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from wanfast.models.dit import first_frame_timesteps


@dataclass
class Condition:
    """What one request's conditioning does to the sampling loop (latents x are [C, F', h, w])."""

    y: Tensor | None = None  # [C_y, F', h, w] concatenated after x on the channel axis (concat)
    first_frame: Tensor | None = None  # [C, 1, h, w]: imposed as latent frame 0 (first_frame)
    patch: tuple[int, int, int] = (1, 2, 2)  # the DiT's patch size: tokens per latent frame

    def model_input(self, x: Tensor) -> Tensor:
        return x if self.y is None else torch.cat([x, self.y.to(x.dtype)], dim=0)

    def impose(self, x: Tensor) -> Tensor:
        """x with latent frame 0 replaced by the image's (official: (1 - m) * z + m * x, m = 0 there)."""
        if self.first_frame is None:
            return x
        return torch.cat([self.first_frame.to(x.dtype), x[:, 1:]], dim=1)

    def timestep(self, t: float, x: Tensor):
        """The DiT's t for one sample: [1], or per token with the first frame's tokens at 0 (first_frame;
        ``models.dit.first_frame_timesteps``, factored: the time MLP runs on the 2 distinct values, and the
        same object serves both CFG passes, so the second reuses the cached embedding)."""
        t_in = torch.full((1,), float(t), device=x.device)
        if self.first_frame is None:
            return t_in
        _, f, h, w = x.shape
        pt, ph, pw = self.patch
        return first_frame_timesteps(t_in, (f // pt, h // ph, w // pw))


def best_output_size(w: int, h: int, dw: int, dh: int, area: int) -> tuple[int, int]:
    """(width, height) on the (dw, dh) grid, within ``area``, closest to the aspect ratio w / h: rounds
    width-first and height-first and keeps the one whose ratio is nearer (official utils formula)."""
    ratio = w / h
    ow = (area * ratio) ** 0.5
    oh = area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(area / ow1 // dh * dh)
    oh2 = int(oh // dh * dh)
    ow2 = int(area / oh2 // dw * dw)
    r1, r2 = ow1 / oh1, ow2 / oh2
    return (ow1, oh1) if max(ratio / r1, r1 / ratio) < max(ratio / r2, r2 / ratio) else (ow2, oh2)


def _to_tensor(img) -> Tensor:
    """PIL RGB -> [3, H, W] float32 in [-1, 1] (torchvision's to_tensor, then (x - 0.5) / 0.5)."""
    import numpy as np

    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return a.float().div(255).sub(0.5).div(0.5)


# -- first_frame (TI2V-5B) --------------------------------------------------------------------------------
def _first_frame_size(spec, image_size: tuple[int, int], area: int) -> tuple[int, int]:
    m = spec.size_multiple
    return best_output_size(image_size[0], image_size[1], m, m, area)


def first_frame_pixels(img, size: tuple[int, int]) -> Tensor:
    """The official TI2V preprocessing: resize by the larger scale (LANCZOS, rounded), center crop to
    ``size`` (width, height) -> [3, 1, H, W] in [-1, 1]."""
    from PIL import Image

    ow, oh = size
    iw, ih = img.size
    scale = max(ow / iw, oh / ih)
    img = img.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1, y1 = (img.width - ow) // 2, (img.height - oh) // 2
    return _to_tensor(img.crop((x1, y1, x1 + ow, y1 + oh)))[:, None]


def _first_frame(spec, vae, img, params, device: torch.device) -> Condition:
    if img is None:
        return Condition()
    pixels = first_frame_pixels(img, (params.width, params.height)).to(device)
    z = vae.encode(pixels[None].to(vae.dtype))[0]  # [C, 1, h, w]
    return Condition(first_frame=z.float(), patch=spec.dit.patch_size)


# -- concat (I2V-A14B) ------------------------------------------------------------------------------------
def _concat_size(spec, image_size: tuple[int, int], area: int) -> tuple[int, int]:
    iw, ih = image_size
    s, p = spec.vae.spatial_stride, spec.dit.patch_size
    lat_h = round(math.sqrt(area * ih / iw) // s // p[1] * p[1])
    lat_w = round(math.sqrt(area * iw / ih) // s // p[2] * p[2])
    return lat_w * s, lat_h * s


def concat_pixels(img, size: tuple[int, int], frames: int) -> Tensor:
    """The official I2V input video: the [-1, 1] image stretched to ``size`` (width, height) by bicubic
    interpolation (fp32, CPU), then ``frames - 1`` zero frames -> [3, frames, H, W]."""
    w, h = size
    first = F.interpolate(_to_tensor(img)[None], size=(h, w), mode="bicubic")  # [1, 3, H, W]
    return torch.cat([first.transpose(0, 1), torch.zeros(3, frames - 1, h, w)], dim=1)


def concat_mask(latent_frames: int, h: int, w: int, device=None) -> Tensor:
    """[4, F', h, w]: video frame 0 repeated 4 times is latent frame 0 (ones), later frames are zeros."""
    mask = torch.zeros(4, latent_frames, h, w, device=device)
    mask[:, 0] = 1.0
    return mask


def _concat(spec, vae, img, params, device: torch.device) -> Condition:
    video = concat_pixels(img, (params.width, params.height), params.frames).to(device)
    z = vae.encode(video[None].to(vae.dtype))[0].float()  # [C, F', h, w]
    return Condition(y=torch.cat([concat_mask(*z.shape[1:], device=z.device), z], dim=0))


@dataclass(frozen=True)
class Conditioning:
    """``size_for_image(spec, (w, h) of the image, max area) -> (width, height)`` of the output, or None
    when the kind takes no image; ``prepare(spec, vae, image | None, params, device) -> Condition``."""

    name: str
    size_for_image: Callable | None
    prepare: Callable[..., Condition]


CONDITIONINGS: dict[str, Conditioning] = {
    "text": Conditioning("text", None, lambda spec, vae, img, params, device: Condition()),
    "first_frame": Conditioning("first_frame", _first_frame_size, _first_frame),
    "concat": Conditioning("concat", _concat_size, _concat),
}
