"""Wan2.2 causal 3D VAE (TI2V-5B): 48 latent channels, stride 4x16x16 (time x height x width).

Module names equal the keys of the official ``Wan2.2_VAE.pth``, so that checkpoint loads as is:
``encoder.downsamples.S.downsamples.J.*`` (stage S: residual blocks J < num_res_blocks, then its resampler)
and ``decoder.upsamples.S.upsamples.J.*`` (num_res_blocks + 1 residual blocks, then its resampler).

Differences from the Wan2.1 VAE (``wanfast.models.vae``), whose blocks are reused where the math is equal:
- Pixels are patchified: each 2x2 pixel patch of the 3 colours becomes 12 channels before the encoder,
  and the decoder's 12 output channels are unpatchified. With the 8x stack that makes stride 16.
- Each resampling stage adds a parameter-free shortcut around its residual blocks and resampler: the
  encoder averages groups of space-to-channel folded values (``AvgDown3d``), the decoder repeats channels
  and unfolds them into space and time (``DupUp3d``).
- Decoder upsamplers keep their channel count (Wan2.1's halve it), and the decoder has its own width.

Streaming is the Wan2.1 one (``WanVAE.encode`` / ``decode``, inherited): encode runs frame 0 alone, then
chunks of 4 frames; decode one latent frame at a time. The patchify is per frame, so the encoder and
decoder apply it to each chunk. First-chunk rules: the resamplers' are Wan2.1's unchanged (``upsample3d``
leaves latent frame 0 as one frame; ``downsample3d`` passes frame 0 through); the new shortcuts follow
them: on the first chunk ``AvgDown3d`` pads time with zeros in front to its factor (frame 0 is averaged
with a zero frame) and ``DupUp3d`` drops all but the last of the frames it makes from latent frame 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wanfast.config import VAE22Config
from wanfast.models.vae import (
    AttentionBlock,
    CausalConv3d,
    Resample,
    ResidualBlock,
    RMSNorm,
    StreamCache,
    WanVAE,
    _run,
)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, p*H, p*W] -> [B, C*p*p, T, H, W]; channel c*p*p + j*p + i holds pixel (p*h + i, p*w + j)
    (the official order: the column offset j before the row offset i)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)  # [B, C, j, i, T, H, W]
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of ``patchify``: [B, C*p*p, T, H, W] -> [B, C, T, p*H, p*W]."""
    if p == 1:
        return x
    b, cp, t, h, w = x.shape
    x = x.view(b, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)  # [B, C, T, H, i, W, j]
    return x.reshape(b, cp // (p * p), t, h * p, w * p)


class AvgDown3d(nn.Module):
    """Shortcut of an encoder stage: fold each ft x fs x fs block of [B, C, T, H, W] into channels
    (C * f values, f = ft*fs*fs, in (c, dt, dh, dw) order) and average consecutive groups of C*f/C' of
    them into the C' output channels. Time is first zero-padded in front to a multiple of ft."""

    def __init__(self, cin: int, cout: int, ft: int, fs: int) -> None:
        super().__init__()
        self.cin, self.cout, self.ft, self.fs = cin, cout, ft, fs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        if x.shape[2] % ft:
            x = F.pad(x, (0, 0, 0, 0, ft - x.shape[2] % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.cout, -1, t // ft, h // fs, w // fs).mean(2)  # [B, C', T/ft, H/fs, W/fs]


class DupUp3d(nn.Module):
    """Shortcut of a decoder stage, the mirror of ``AvgDown3d``: each input channel repeated
    r = C'*f/C times, the C*r copies read as [C', ft, fs, fs] and unfolded into time and space.
    ``first``: keep only the last of the ft frames made from the chunk's first frame (as the resampler,
    which does not upsample time on the first chunk)."""

    def __init__(self, cin: int, cout: int, ft: int, fs: int) -> None:
        super().__init__()
        self.cin, self.cout, self.ft, self.fs = cin, cout, ft, fs
        self.repeats = cout * ft * fs * fs // cin

    def forward(self, x: torch.Tensor, first: bool = False) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        b, c, t, h, w = x.shape
        x = x.unsqueeze(2).expand(b, c, self.repeats, t, h, w).reshape(b, self.cout, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.cout, t * ft, h * fs, w * fs)
        return x[:, :, ft - 1 :] if first else x


class Resample22(Resample):
    """``Resample`` whose upsampling conv keeps the channel count (Wan2.2); the rest is Wan2.1's."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__(dim, mode)
        if mode.startswith("up"):
            self.resample[1] = nn.Conv2d(dim, dim, 3, padding=1)


class DownStage(nn.Module):
    """Encoder stage: residual blocks, then (``down``) a resampler; plus the ``AvgDown3d`` shortcut."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.avg_shortcut = AvgDown3d(cin, cout, 2 if temporal else 1, 2 if down else 1)
        layers: list[nn.Module] = []
        for _ in range(num_res_blocks):
            layers.append(ResidualBlock(cin, cout))
            cin = cout
        if down:
            layers.append(Resample22(cout, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        return _run(self.downsamples, x, cache) + self.avg_shortcut(x)


class UpStage(nn.Module):
    """Decoder stage: residual blocks, then (``up``) a resampler and the ``DupUp3d`` shortcut."""

    def __init__(self, cin: int, cout: int, num_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.avg_shortcut = DupUp3d(cin, cout, 2 if temporal else 1, 2) if up else None
        layers: list[nn.Module] = []
        for _ in range(num_blocks):
            layers.append(ResidualBlock(cin, cout))
            cin = cout
        if up:
            layers.append(Resample22(cout, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        y = _run(self.upsamples, x, cache)
        return y if self.avg_shortcut is None else y + self.avg_shortcut(x, first=cache.first)


class Encoder22(nn.Module):
    """Video [B, 3, T, H, W] -> [B, 2*z_dim, T', H/16, W/16] (mean and log-variance)."""

    def __init__(self, cfg: VAE22Config) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        n = len(cfg.dim_mult)
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3 * cfg.patch_size**2, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*(
            DownStage(dims[i], dims[i + 1], cfg.num_res_blocks,
                      temporal=i < n - 1 and cfg.temporal_downsample[i], down=i < n - 1)
            for i in range(n)
        ))  # fmt: skip
        d = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(d, d), AttentionBlock(d), ResidualBlock(d, d))
        self.head = nn.Sequential(RMSNorm(d), nn.SiLU(), CausalConv3d(d, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = self.conv1(patchify(x, self.patch_size), cache)  # [B, 12, T, H/2, W/2] in, dim channels out
        for stage in self.downsamples:
            x = stage(x, cache)
        return _run(self.head, _run(self.middle, x, cache), cache)


class Decoder22(nn.Module):
    """Latents [B, z_dim, T', h, w] -> video [B, 3, T, 16h, 16w] (unclamped)."""

    def __init__(self, cfg: VAE22Config) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        n = len(cfg.dim_mult)
        dims = [cfg.dec_dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        d = dims[0]
        self.middle = nn.Sequential(ResidualBlock(d, d), AttentionBlock(d), ResidualBlock(d, d))
        self.upsamples = nn.Sequential(*(
            UpStage(dims[i], dims[i + 1], cfg.num_res_blocks + 1,
                    temporal=i < n - 1 and temporal_upsample[i], up=i < n - 1)
            for i in range(n)
        ))  # fmt: skip
        out = 3 * cfg.patch_size**2
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], out, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = _run(self.middle, self.conv1(x, cache), cache)
        for stage in self.upsamples:
            x = stage(x, cache)
        return unpatchify(_run(self.head, x, cache), self.patch_size)  # [B, 12, T, 8h, 8w] -> pixels


class Wan22VAE(WanVAE):
    """The Wan2.2 VAE. ``encode``/``decode`` work on DiT-normalised latents ((mu - mean) / std), exactly as
    ``WanVAE``'s (inherited: same streaming, checks, normalisation with the constants of ``cfg``, fp32
    outputs; strides from ``cfg``): encode takes video [B, 3, F, H, W] in [-1, 1] (F = 4n+1, H and W
    multiples of 16) to [B, 48, (F-1)/4 + 1, H/16, W/16]; decode maps those back, clamped to [-1, 1]."""

    def __init__(self, cfg: VAE22Config) -> None:
        nn.Module.__init__(self)  # not WanVAE.__init__: it would build the Wan2.1 encoder and decoder
        self.cfg = cfg
        self.encoder = Encoder22(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # before the split into mu / log-var
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # before the decoder
        self.decoder = Decoder22(cfg)
