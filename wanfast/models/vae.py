"""Wan2.1 causal 3D VAE: 16 latent channels, stride 4x8x8 (time x height x width).

Module names equal the keys of the official ``Wan2.1_VAE.pth`` (``encoder.downsamples.3.residual.2.weight``
...), so that checkpoint loads as is. Time is streamed as the official code does: encode runs frame 0 alone,
then chunks of ``temporal_stride`` (4) frames; decode runs one latent frame at a time. Across chunks every
causal conv carries the trailing frames of its input in a ``StreamCache``, which makes the streamed result
equal to a causal pass over the whole clip, except for the first-chunk rules of the temporal resamplers
(see ``Resample``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from wanfast.config import VAEConfig


class StreamCache:
    """State of one streamed encode or decode call.

    ``frames[layer]`` holds what ``layer`` needs from the previous chunk (the last input frames of a causal
    conv, [B, C, <=2, H, W]); ``first`` is True while the first chunk runs.
    """

    def __init__(self) -> None:
        self.frames: dict[nn.Module, torch.Tensor] = {}
        self.first = True


class CausalConv3d(nn.Conv3d):
    """Conv3d padded symmetrically in space and only on the past side in time (2 * padding_t frames)."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__(cin, cout, kernel, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad = 2 * pt
        self.space_pad = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        pad_t = self.time_pad
        if cache is not None and pad_t:
            prev = cache.frames.get(self)
            # Keep the last pad_t input frames for the next chunk; a 1-frame chunk borrows one from before.
            # clone: a slice would keep the whole chunk alive.
            keep = x[:, :, -pad_t:].clone()
            if prev is not None:
                if keep.shape[2] < pad_t:
                    keep = torch.cat([prev[:, :, -1:], keep], 2)
                x = torch.cat([prev, x], 2)
                pad_t -= prev.shape[2]
            cache.frames[self] = keep
        return super().forward(F.pad(x, (*self.space_pad, pad_t, 0)))


class RMSNorm(nn.Module):
    """Channel (dim 1) L2 norm times sqrt(C) and a gain. ``ndim`` is the input rank (5: video, 4: frames)."""

    def __init__(self, dim: int, ndim: int = 5) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (ndim - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 as the official autocast region computes it (F.normalize's norm runs in fp32 there).
        return (F.normalize(x.float(), dim=1) * self.scale * self.gamma.float()).to(x.dtype)


def _run(layers: nn.Sequential, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
    """Apply ``layers`` in order, handing the cache to the layers that stream over time."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResidualBlock, Resample)) else layer(x)
    return x


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        # Indices 0..6 are the official key names: norm, act, conv, norm, act, dropout (inference: none), conv.
        self.residual = nn.Sequential(
            RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            RMSNorm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        return self.shortcut(x) + _run(self.residual, x, cache)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, ndim=4)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(y)).flatten(2).transpose(1, 2).unsqueeze(1)  # [B*T, 1, H*W, 3C]
        y = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # [B*T, 1, H*W, C]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.view(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """2x spatial up/down-sampling (a 2D conv per frame), with 2x in time for the ``*3d`` modes.

    Upsampling halves the channels. First-chunk rules (official): ``upsample3d`` leaves the first chunk
    alone (latent frame 0 -> 1 frame, later ones -> 2 each); ``downsample3d`` passes the first chunk through
    and later applies its stride-2 time conv to [last frame of the previous chunk, chunk], so video frame 0
    -> latent frame 0 and each later 4 frames -> 1.
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(
                nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                nn.Conv2d(dim, dim // 2, 3, padding=1),
            )
        else:  # pad right/bottom only, then a stride-2 conv
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":  # each frame -> 2 frames, as two channel groups
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and not cache.first:
            # From the second chunk on, a causal conv whose history starts at that chunk (zeros before it).
            x = self.time_conv(x, cache).view(b, 2, c, t, h, w)
            x = x.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)  # frame 2i + j <- group j of frame i
        t = x.shape[2]
        x = self.resample(x.transpose(1, 2).flatten(0, 1))  # [B*T, C', H', W']
        x = x.view(b, t, *x.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d":
            last = x[:, :, -1:].clone()
            if not cache.first:
                x = self.time_conv(torch.cat([cache.frames[self], x], 2))  # [B, C, T/2, H', W']
            cache.frames[self] = last
        return x


class Encoder(nn.Module):
    """Video [B, 3, T, H, W] -> [B, 2*z_dim, T', H/8, W/8] (mean and log-variance)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                layers.append(Resample(cout, mode))
        self.downsamples = nn.Sequential(*layers)
        d = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(d, d), AttentionBlock(d), ResidualBlock(d, d))
        self.head = nn.Sequential(RMSNorm(d), nn.SiLU(), CausalConv3d(d, cfg.z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for part in (self.downsamples, self.middle, self.head):
            x = _run(part, x, cache)
        return x


class Decoder(nn.Module):
    """Latents [B, z_dim, T', h, w] -> video [B, 3, T, 8h, 8w] (unclamped)."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        d = dims[0]
        self.middle = nn.Sequential(ResidualBlock(d, d), AttentionBlock(d), ResidualBlock(d, d))
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:  # the previous stage's upsampler halved the channels
                cin //= 2
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(cfg.dim_mult) - 1:
                mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
                layers.append(Resample(cout, mode))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for part in (self.middle, self.upsamples, self.head):
            x = _run(part, x, cache)
        return x


class WanVAE(nn.Module):
    """The Wan2.1 VAE. ``encode``/``decode`` work on DiT-normalised latents ((mu - mean) / std).

    Computes in the parameter dtype; latent normalisation and outputs are fp32. The normalisation constants
    come from ``cfg`` (not buffers: the official checkpoint has none, and ``.to(bf16)`` would round them).
    """

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # before the split into mu / log-var
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # before the decoder
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def _scale(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (mean, 1/std), each [1, z_dim, 1, 1, 1]; the official scales by the reciprocal std."""
        mean = torch.tensor(self.cfg.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(self.cfg.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        return mean, 1.0 / std

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] (F = 4n+1, H and W multiples of 8) -> normalised latent mean
        [B, z_dim, (F-1)/4 + 1, H/8, W/8], fp32."""
        ts, ss = self.cfg.temporal_stride, self.cfg.spatial_stride
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video [B, 3, F, H, W], got {tuple(video.shape)}")
        f, h, w = video.shape[2:]
        if (f - 1) % ts or h % ss or w % ss:
            raise ValueError(f"need F = {ts}n+1 frames and H, W multiples of {ss}; got F={f}, H={h}, W={w}")
        x = video.to(self.dtype)
        cache, out = StreamCache(), []
        bounds = [0, *range(1, f + 1, ts)]  # frame 0 alone, then ts frames at a time -> 1 latent frame each
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            out.append(self.encoder(x[:, :, a:b], cache))
            cache.first = False
        mu = self.conv1(torch.cat(out, 2))[:, : self.cfg.z_dim]  # drop the log-variance half
        mean, inv_std = self._scale(mu.device)
        return (mu.float() - mean) * inv_std

    def decode(
        self, latents: torch.Tensor, on_frames: Callable[[torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """Normalised latents [B, z_dim, F', h, w] -> video [B, 3, 4(F'-1)+1, 8h, 8w] in [-1, 1], fp32.

        ``on_frames(chunk)``: called with each latent frame's video as it is decoded, in order
        ([B, 3, 1 then 4, 8h, 8w], fp32, clamped: the values the returned video holds there), e.g. to
        encode the MP4 meanwhile. The returned video is the same with or without it."""
        if latents.ndim != 5 or latents.shape[1] != self.cfg.z_dim:
            raise ValueError(f"expected latents [B, {self.cfg.z_dim}, F, H, W], got {tuple(latents.shape)}")
        mean, inv_std = self._scale(latents.device)
        x = self.conv2((latents.float() / inv_std + mean).to(self.dtype))
        cache, out = StreamCache(), []
        for i in range(x.shape[2]):  # one latent frame at a time: frame 0 -> 1 frame, later ones -> 4
            out.append(self.decoder(x[:, :, i : i + 1], cache))
            cache.first = False
            if on_frames is not None:
                on_frames(out[-1].float().clamp(-1.0, 1.0))  # a new tensor: out[-1] stays as it was
        return torch.cat(out, 2).float().clamp_(-1.0, 1.0)
