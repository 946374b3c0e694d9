"""Faster VAE decode: ``optimize_vae`` turns a built ``WanVAE`` (Wan2.1) or ``Wan22VAE`` into an
equivalent, faster one.

``wanfast.models.vae`` stays the eager reference. The transform swaps the classes of the decoder's modules
(and of the ``WanVAE`` itself) for subclasses with other forwards and changes weights' memory layout;
parameter names, shapes and values stay, so ``state_dict`` is unchanged. Apply it after the weights load.
Each choice is a field of ``VAEDecodeOptions`` so benchmarks/vae_gpu_bench.py can measure it alone:

- cudnn_benchmark: cuDNN times its conv algorithms once per shape (set only while decoding).
- channels_last: weights and activations NDHWC, the layout of cuDNN's tensor-core conv kernels; the frames
  of a [1, C, T, H, W] activation are then a free [T, C, H, W] channels_last view for the 2D convs.
- causal_conv: a causal conv copies its input once, after the cached (or zero) frames, into one buffer and
  pads space inside the conv; the plain path makes two copies (torch.cat, then F.pad).
- conv2d_split: a kt x kh x kw conv as kt 2D convs over time-shifted frame views, summed (needs causal_conv).
- fused_norm: RMSNorm + SiLU in one pass ("triton" kernel or "compile"; on CPU both run eagerly), written
  straight into the next causal conv's padded buffer when causal_conv is on: no copy at all there.
- subpixel_upsample: nearest 2x + 3x3 conv == a 2x2 conv with 4x the output channels on the small frames,
  phases interleaved after: 2.25x fewer FLOPs and no 4x-sized upsampled tensor.
- prealloc_output: each chunk goes straight into the fp32 output video (no list of chunks + torch.cat).
- encoder: the encoder (the I2V image encode: 81 frames at 720p) gets the same causal conv, layout and fused
  norm rewrites (its downsamplers run as before, on the same layout); off, encode is the plain one.

The Wan2.2 VAE's encoder stays plain (TI2V encodes one frame). The Wan2.2 VAE shares those blocks (its upsamplers keep their width: the sub-pixel rewrite reads the conv's
shapes) and always adds its stages' DupUp3d shortcuts in place, through a strided view of the stage output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from wanfast.config import EngineSettings
from wanfast.kernels import vae_norm
from wanfast.models.vae import (
    CausalConv3d,
    Decoder,
    Encoder,
    Resample,
    ResidualBlock,
    RMSNorm,
    StreamCache,
    WanVAE,
    _run,
)
from wanfast.models.vae22 import Decoder22, UpStage, Wan22VAE, unpatchify

NORM_IMPLS = (None, "triton", "compile", "eager")


@dataclass(frozen=True)
class VAEDecodeOptions:
    """Which decode optimisations ``optimize_vae`` applies (defaults: the choice for nvidia-h200)."""

    cudnn_benchmark: bool = True
    channels_last: bool = True
    causal_conv: bool = True
    conv2d_split: bool = False
    fused_norm: str | None = "triton"
    subpixel_upsample: bool = True
    prealloc_output: bool = True
    encoder: bool = True

    def __post_init__(self) -> None:
        if self.fused_norm not in NORM_IMPLS:
            raise ValueError(f"fused_norm must be one of {NORM_IMPLS}, got {self.fused_norm!r}")
        if self.conv2d_split and not self.causal_conv:
            raise ValueError("conv2d_split needs causal_conv (the split lives in the swapped conv)")

    @classmethod
    def off(cls, **on: object) -> VAEDecodeOptions:
        """Every option off, then ``on``: one variant alone, for measurements."""
        none = {f.name: None if f.name == "fused_norm" else False for f in fields(cls)}
        return cls(**{**none, **on})


# ---- fused RMSNorm + SiLU (kernels/vae_norm.py) -------------------------------------------------------


def norm_silu(norm: RMSNorm, x: torch.Tensor, impl: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(norm(x)) in one pass, written into ``out`` (default: a new tensor like x). The Triton and
    compiled versions run on CUDA only; elsewhere the eager one."""
    # empty_like keeps channels-last [B, C, T, H, W] (a [B, C, S] view); other layouts are made dense
    if out is None:
        cl = x.is_contiguous(memory_format=torch.channels_last_3d)
        out = torch.empty_like(x, memory_format=torch.channels_last_3d if cl else torch.contiguous_format)
    if x.is_cuda and impl == "triton" and vae_norm.triton is not None:
        vae_norm.norm_silu_triton(x, norm.gamma, norm.scale, out)
    elif x.is_cuda and impl == "compile":
        vae_norm.compiled_norm_silu_into()(x, norm.gamma, norm.scale, out)
    else:
        vae_norm.norm_silu_into(x, norm.gamma, norm.scale, out)
    return out


# ---- swapped module classes ----------------------------------------------------------------------------


class FastCausalConv3d(CausalConv3d):
    """A causal conv whose input is written once into a [B, C, time_pad + T, H, W] buffer after the cached
    frames (zeros at the start); space is padded by the conv. Its cache entry is then always the buffer's
    last time_pad frames, zero frames included, which is what the plain conv's shorter entries plus F.pad
    amount to. ``split``: run as kt 2D convs over time-shifted frame views (weights laid out per tap)."""

    memory_format: torch.memory_format
    split: bool

    def padded_input(self, x: torch.Tensor, cache: StreamCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffer for input ``x`` with its first time_pad frames filled, and the view of the T frames
        after them, for the caller to fill."""
        b, c, t, h, w = x.shape
        p = self.time_pad
        buf = torch.empty(
            (b, c, p + t, h, w), dtype=x.dtype, device=x.device, memory_format=self.memory_format
        )
        prev = cache.frames.get(self) if cache is not None else None
        if prev is None:
            buf[:, :, :p].zero_()
        else:
            buf[:, :, :p].copy_(prev)
        return buf, buf[:, :, p:]

    def run_padded(self, buf: torch.Tensor, cache: StreamCache | None) -> torch.Tensor:
        p = self.time_pad
        if cache is not None and p:
            cache.frames[self] = buf[:, :, -p:].clone(memory_format=self.memory_format)  # 2 frames, not buf
        return self._conv(buf)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if not self.time_pad:
            return self._conv(x)
        buf, body = self.padded_input(x, cache)
        body.copy_(x)
        return self.run_padded(buf, cache)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """Conv over time-padded x [B, C, T + kt - 1, H, W] -> [B, C', T, H', W'], space padded here."""
        ph, pw = self.space_pad[2], self.space_pad[0]
        if not self.split:
            return F.conv3d(x, self.weight, self.bias, self.stride, (0, ph, pw), self.dilation, self.groups)
        b, c, tp, h, w = x.shape
        t = tp - self.kernel_size[0] + 1
        out = None
        for k in range(self.kernel_size[0]):
            # Frames k..k+T-1 as a [B*T, C, H, W] batch: a view for B = 1 in channels_last (a copy otherwise).
            frames = x[:, :, k : k + t].transpose(1, 2).reshape(b * t, c, h, w)
            y = F.conv2d(frames, self.weight[:, :, k], self.bias if k == 0 else None, padding=(ph, pw))
            out = y if out is None else out.add_(y)
        return out.view(b, t, *out.shape[1:]).transpose(1, 2)


def _norm_silu_conv(norm: RMSNorm, conv: CausalConv3d, x: torch.Tensor, cache: StreamCache, impl: str | None):
    """conv(SiLU(norm(x))): fused into the conv's padded input buffer when it can be, plain otherwise."""
    if impl is None:
        return conv(F.silu(norm(x)), cache)
    if isinstance(conv, FastCausalConv3d) and conv.time_pad:
        buf, body = conv.padded_input(x, cache)
        norm_silu(norm, x, impl, out=body)
        return conv.run_padded(buf, cache)
    return conv(norm_silu(norm, x, impl), cache)


class FastResidualBlock(ResidualBlock):
    norm_impl: str | None

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        r = self.residual  # norm, SiLU, conv, norm, SiLU, dropout (identity), conv
        h = _norm_silu_conv(r[0], r[2], x, cache, self.norm_impl)
        h = _norm_silu_conv(r[3], r[6], h, cache, self.norm_impl)
        return h.add_(self.shortcut(x))  # in place: no third full-size activation


class FastDecoder(Decoder):
    norm_impl: str | None

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = _run(self.upsamples, _run(self.middle, self.conv1(x, cache), cache), cache)
        return _norm_silu_conv(self.head[0], self.head[2], x, cache, self.norm_impl)


class FastEncoder(Encoder):
    norm_impl: str | None

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = _run(self.middle, _run(self.downsamples, self.conv1(x, cache), cache), cache)
        return _norm_silu_conv(self.head[0], self.head[2], x, cache, self.norm_impl)


class FastUpStage(UpStage):
    """A Wan2.2 decoder stage adding its ``DupUp3d`` shortcut into the output in place: the output viewed
    as [B, C', ft, fs, fs, T, H, W] += the input broadcast over the repeats (no repeated, permuted copy
    and no third tensor, each the size of the output). Same values: the same two operands are added."""

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        y = _run(self.upsamples, x, cache)  # a new tensor: safe to add into
        up = self.avg_shortcut
        if up is None:
            return y
        if cache.first:  # keeps only the last of the ft frames (one frame): the plain shortcut
            return y.add_(up(x, first=True))
        b, c, t, h, w = x.shape
        ft, fs = up.ft, up.fs
        src = x.unsqueeze(2).expand(b, c, up.repeats, t, h, w).reshape(b, up.cout, ft, fs, fs, t, h, w)
        y.view(b, up.cout, t, ft, h, fs, w, fs).permute(0, 1, 3, 5, 7, 2, 4, 6).add_(src)
        return y


class FastDecoder22(Decoder22):
    norm_impl: str | None

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = _run(self.middle, self.conv1(x, cache), cache)
        for stage in self.upsamples:
            x = stage(x, cache)
        x = _norm_silu_conv(self.head[0], self.head[2], x, cache, self.norm_impl)
        return unpatchify(x, self.patch_size)


# Nearest 2x then a 3x3 conv: output row 2i + d reads input rows (i - 1, i) for d = 0 and (i, i + 1) for
# d = 1. _PHASE_TAPS[d, a, k] = 1 where 3x3 kernel row k lands on 2x2 tap a of phase d (same for columns).
_PHASE_TAPS = ((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1))


class FastResample(Resample):
    """Upsampling that keeps the memory format (time interleave into a preallocated tensor) and optionally
    runs the spatial 2x + 3x3 conv as a sub-pixel 2x2 conv. Downsampling (encoder only) is unchanged."""

    memory_format: torch.memory_format
    subpixel: bool

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        if not self.mode.startswith("up"):
            return super().forward(x, cache)
        b, c, t, h, w = x.shape
        if self.mode == "upsample3d" and not cache.first:
            y = self.time_conv(x, cache)  # [B, 2C, T, H, W]: channel group j is output frame 2i + j
            x = torch.empty(
                (b, c, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=self.memory_format
            )
            pairs = x.view(b, c, t, 2, h, w)
            pairs[:, :, :, 0], pairs[:, :, :, 1] = y[:, :c], y[:, c:]
            del y
            t *= 2
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # a view in channels_last for B = 1
        y = self._subpixel(frames) if self.subpixel else self.resample(frames)  # [B*T, C/2, 2H, 2W]
        return y.view(b, t, *y.shape[1:]).transpose(1, 2)

    def _subpixel(self, frames: torch.Tensor) -> torch.Tensor:
        conv = self.resample[1]
        co, ci = conv.weight.shape[:2]
        taps = torch.tensor(_PHASE_TAPS, dtype=torch.float32, device=frames.device)  # [2, 2, 3]
        # w4[(di, dj, o), i, a, b] = sum_kl taps[di, a, k] taps[dj, b, l] w[o, i, k, l], summed in fp32.
        w4 = torch.einsum("pak,qbl,oikl->pqoiab", taps, taps, conv.weight.float()).reshape(4 * co, ci, 2, 2)
        fmt = torch.channels_last if self.memory_format == torch.channels_last_3d else torch.contiguous_format
        w4 = w4.to(frames.dtype).contiguous(memory_format=fmt)
        y = F.conv2d(frames, w4, conv.bias.repeat(4), padding=1)  # [N, 4 C', H + 1, W + 1]
        n, _, h, w = frames.shape
        out = torch.empty((n, co, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=fmt)
        grid = out.view(n, co, h, 2, w, 2)  # [n, c, i, di, j, dj] = out[n, c, 2i + di, 2j + dj]
        for di in range(2):
            for dj in range(2):
                p = 2 * di + dj  # phase d reads 2x2 outputs shifted by d (rows i - 1 + d .. i + d)
                grid[:, :, :, di, :, dj] = y[:, p * co : (p + 1) * co, di : di + h, dj : dj + w]
        return out


@contextlib.contextmanager
def _decode_flags(opts: VAEDecodeOptions) -> Iterator[None]:
    """cudnn.benchmark and the dynamo recompile limit, set for one decode and restored after."""
    saved = torch.backends.cudnn.benchmark
    with contextlib.ExitStack() as stack:
        if opts.fused_norm == "compile":
            import torch._dynamo.config as dynamo_config

            name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
            stack.enter_context(dynamo_config.patch(**{name: 64}))
        torch.backends.cudnn.benchmark = saved or opts.cudnn_benchmark
        try:
            yield
        finally:
            torch.backends.cudnn.benchmark = saved


class FastWanVAE(WanVAE):
    decode_options: VAEDecodeOptions

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """``WanVAE.encode`` under ``cudnn_benchmark`` (cuDNN times its conv algorithms once per shape), with
        the rewritten encoder modules and the video in their layout when ``encoder`` is on."""
        opts = self.decode_options
        if opts.encoder and opts.channels_last and isinstance(self.encoder, FastEncoder):
            video = video.contiguous(memory_format=torch.channels_last_3d)  # [B, 3, F, H, W], NDHWC
        with _decode_flags(opts if opts.encoder else replace(opts, fused_norm=None)):
            return super().encode(video)

    def decode(
        self, latents: torch.Tensor, on_frames: Callable[[torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """As ``WanVAE.decode`` (normalised latents -> fp32 video in [-1, 1], ``on_frames`` called with each
        latent frame's clamped video), with ``decode_options``."""
        if latents.ndim != 5 or latents.shape[1] != self.cfg.z_dim:
            raise ValueError(f"expected latents [B, {self.cfg.z_dim}, F, H, W], got {tuple(latents.shape)}")
        opts = self.decode_options
        mean, inv_std = self._scale(latents.device)
        x = self.conv2((latents.float() / inv_std + mean).to(self.dtype))  # [B, z, F', h, w], small
        if opts.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        b, _, n, h, w = x.shape
        ts, ss = self.cfg.temporal_stride, self.cfg.spatial_stride
        out = chunks = None
        if opts.prealloc_output:
            out = torch.empty((b, 3, ts * (n - 1) + 1, ss * h, ss * w), dtype=torch.float32, device=x.device)
        else:
            chunks = []
        cache, t0 = StreamCache(), 0
        with _decode_flags(opts):
            for i in range(n):  # latent frame 0 -> 1 video frame, later ones -> ts each
                y = self.decoder(x[:, :, i : i + 1], cache)
                f = y.shape[2]
                if out is None:
                    chunks.append(y)
                    if on_frames is not None:
                        on_frames(y.float().clamp(-1.0, 1.0))  # a new tensor: y stays as it was
                else:
                    out[:, :, t0 : t0 + f].copy_(y)  # fp32, NCDHW; y (bf16, NDHWC) is freed
                    if on_frames is not None:  # clamped in place: the final clamp_ leaves these as they are
                        on_frames(out[:, :, t0 : t0 + f].clamp_(-1.0, 1.0))
                t0 += f
                del y
                cache.first = False
        del cache
        if out is None:
            return torch.cat(chunks, 2).float().clamp_(-1.0, 1.0)
        if t0 != out.shape[2]:
            raise RuntimeError(f"decoder made {t0} frames, expected {out.shape[2]}")
        return out.clamp_(-1.0, 1.0)


class FastWan22VAE(Wan22VAE, FastWanVAE):
    """A ``Wan22VAE`` with ``FastWanVAE.decode`` (its decoder returns unpatchified frames, so the same
    streaming and output buffer apply)."""


def _layout_weights(module: nn.Module, opts: VAEDecodeOptions) -> None:
    """Weights in the layout their conv runs in: NDHWC / NHWC, or per time tap for the split convs."""
    w = module.weight
    if isinstance(module, FastCausalConv3d) and module.split:
        # Stored [kt, C', (kh, kw, C | C, kh, kw)] under the [C', C, kt, kh, kw] view: weight[:, :, k] is
        # then a dense 2D conv weight in the wanted format, with no copy per call.
        order = (2, 0, 3, 4, 1) if opts.channels_last else (2, 0, 1, 3, 4)
        inverse = tuple(order.index(i) for i in range(5))
        w.data = w.data.permute(order).contiguous().permute(inverse)
    elif opts.channels_last and w.ndim == 5:
        w.data = w.data.contiguous(memory_format=torch.channels_last_3d)
    elif opts.channels_last and w.ndim == 4:
        w.data = w.data.contiguous(memory_format=torch.channels_last)


def optimize_vae(vae: WanVAE, settings: EngineSettings, **options: object) -> WanVAE:
    """Make ``vae``'s (a ``WanVAE`` or ``Wan22VAE``) decode faster, in place (returned too).
    ``settings.optimize_vae`` off, or an already optimised vae: returned untouched. ``options`` override
    ``VAEDecodeOptions``' defaults."""
    if not settings.optimize_vae or isinstance(vae, FastWanVAE):
        return vae
    opts = replace(VAEDecodeOptions(), **options)
    fmt = torch.channels_last_3d if opts.channels_last else torch.contiguous_format
    wan22 = isinstance(vae, Wan22VAE)
    parts = [vae.decoder] + ([vae.encoder] if opts.encoder and not wan22 else [])
    for m in (m for part in parts for m in part.modules()):
        if isinstance(m, CausalConv3d) and opts.causal_conv:
            m.__class__ = FastCausalConv3d
            m.memory_format = fmt
            m.split = opts.conv2d_split and (m.stride, m.dilation, m.groups) == ((1, 1, 1), (1, 1, 1), 1)
        elif isinstance(m, ResidualBlock):
            m.__class__ = FastResidualBlock
            m.norm_impl = opts.fused_norm
        elif isinstance(m, Resample):
            m.__class__ = FastResample
            m.memory_format, m.subpixel = fmt, opts.subpixel_upsample
        elif isinstance(m, UpStage):
            m.__class__ = FastUpStage
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            _layout_weights(m, opts)
    vae.decoder.__class__ = FastDecoder22 if wan22 else FastDecoder
    vae.decoder.norm_impl = opts.fused_norm
    if vae.encoder in parts:
        vae.encoder.__class__ = FastEncoder
        vae.encoder.norm_impl = opts.fused_norm
    vae.__class__ = FastWan22VAE if wan22 else FastWanVAE
    vae.decode_options = opts
    return vae
