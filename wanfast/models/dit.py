"""WanDiT: the Wan2.2 diffusion transformer (one expert; T2V and TI2V), plain eager PyTorch.

Module names equal the official ``WanModel`` checkpoint keys, so official state dicts load as-is.

Timesteps: ``t`` [B] (one per sample, T2V) or one per token (TI2V: the first latent frame's tokens at 0 in
image mode), given as [B, L] or factored as ``PerToken(values [U], index [B, L])``. Per token, the time
MLPs run on the U distinct values only (1 or 2 per step in the TI2V pipeline; embedding all L tokens at
5B 720p would cost ~3.6 TFLOP in float32), and every modulation (blocks and head) takes its rows per token
through ``index``, as the official model's [B, L, 6, C] time projection gives the same numbers.

Precision follows the official model under bf16 autocast, made explicit so no autocast is needed:
- time embedding (sinusoid in float64, then float32), time MLP, modulation and head run in float32;
- LayerNorm / RMSNorm statistics are computed in float32 and cast back;
- the residual stream becomes float32 at the first gate (``x + y * gate`` with a float32 gate) and stays so;
- every other Linear / attention runs in the weight dtype (``WanDiT.dtype``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wanfast.attention import attention
from wanfast.config import DiTConfig


class PerToken(NamedTuple):
    """A per-token quantity, factored: token i of sample b takes row ``index[b, i]`` of ``table``.

    ``table`` [U, ...] holds one row per distinct timestep; ``index`` [B, L] (int64; [B, l] once Ulysses
    keeps this rank's tokens). As a timestep ``t``: table [U]; as the time embedding e: [U, C]; as its
    projection e0: [U, 6, C]. Rows need not be distinct, only the index matters."""

    table: Tensor
    index: Tensor


Timesteps = Tensor | PerToken  # [B] (or a scalar / [1], shared by the batch), [B, L], or PerToken


def factor_timesteps(t: Tensor) -> PerToken:
    """Per-token timesteps [B, L] -> PerToken(distinct values [U], index [B, L]). ``torch.unique`` has a
    data-dependent size, so on a GPU this waits for the device once (the accel cache runs it once per
    step); ``first_frame_timesteps`` builds the factored form directly, without waiting."""
    values, index = torch.unique(t, return_inverse=True)
    return PerToken(values, index)


def first_frame_timesteps(t: Tensor | float, grid: tuple[int, int, int]) -> PerToken:
    """TI2V image mode: timesteps [B] (or a scalar) -> per-token timesteps over the L = f*h*w patch tokens
    of ``grid``: 0 on the first latent frame's h*w tokens, t[b] on every other token of sample b (the
    official pipeline builds the same values densely as first-frame mask * t). Factored with no host sync:
    values [1 + B] = (0, t_0, .., t_{B-1}), index [B, L]."""
    t = torch.as_tensor(t).reshape(-1)  # [B]
    f, h, w = grid
    values = torch.cat([t.new_zeros(1), t])
    index = torch.arange(1, t.numel() + 1, device=t.device)[:, None].repeat(1, f * h * w)  # [B, L]
    index[:, : h * w] = 0
    return PerToken(values, index)


def as_timesteps(t: Timesteps | float, device: torch.device) -> Timesteps:
    """``t`` on ``device``: the very object when already there (the accel cache keys on identity)."""
    if not isinstance(t, PerToken):
        return torch.as_tensor(t, device=device)
    table, index = torch.as_tensor(t.table, device=device), t.index.to(device)
    return t if table is t.table and index is t.index else PerToken(table, index)


def modulation_rows(mod: Tensor, e: Tensor | PerToken) -> Callable[[int], Tensor]:
    """Row k of ``mod + e`` (float32), broadcastable against the stream x [B, l, C].

    ``mod`` [1, K, C] is a block's (K = 6) or the head's (K = 2) table. ``e`` [B, K, C]: rows [B, 1, C],
    one per sample. ``e`` PerToken(table [U, K, C], index [B, l]): rows [B, l, C], gathered through the
    index where each is used; a compiled block fuses that gather into the kernel consuming the row (an
    indirect load), so no [B, l, K, C] tensor exists, and eager makes one [B, l, C] at a time."""
    if isinstance(e, PerToken):
        table, index = mod.float()[0] + e.table, e.index  # [U, K, C] float32: each distinct timestep's rows
        return lambda k: table[:, k][index]  # [B, l, C]
    rows = (mod.float() + e).chunk(mod.shape[1], dim=1)  # K x [B, 1, C]
    return lambda k: rows[k]


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Timestep sinusoid [B] -> [B, dim] float32, cos half first. Computed in float64 as official."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(pos, freqs)  # [B, half]
    return torch.cat([angles.cos(), angles.sin()], dim=1).float()


def rope_angles(cfg: DiTConfig, grid: tuple[int, int, int], device: torch.device | None = None) -> Tensor:
    """RoPE angles [L, D/2] (float64) for a (frames, rows, cols) patch grid, L = f*h*w in row-major order.

    The head dim D is split between the axes as ``cfg.rope_axes_dim``; each axis has its own frequency
    ladder theta^(-2i/d_axis) over its own d_axis, as the official ``rope_params`` per axis.
    """
    parts = []
    for n, d in zip(grid, cfg.rope_axes_dim, strict=True):
        inv = cfg.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        parts.append(torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv))  # [n, d/2]
    f, h, w = grid
    angles = torch.cat(
        [
            parts[0][:, None, None].expand(f, h, w, -1),
            parts[1][None, :, None].expand(f, h, w, -1),
            parts[2][None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return angles.reshape(f * h * w, -1)


def rope_freqs(
    cfg: DiTConfig, grid: tuple[int, int, int], device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """(cos, sin), each [L, D/2] float32, for the patch grid. Pure: cacheable per (cfg, grid, device)."""
    angles = rope_angles(cfg, grid, device)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved (real, imag) pairs of x [B, L, H, D] by cos/sin [L, D/2]; returns float32.

    Official computes this complex product in float64; float32 differs by ~1e-7 relative.
    """
    xr, xi = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, H, D/2] each
    cos, sin = cos[:, None], sin[:, None]  # [L, 1, D/2]
    return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(-2)


def _linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """A Linear evaluated in float32 whatever its weight dtype (time MLP, head)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype (official ``WanLayerNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False):
        super().__init__(dim, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm over the full dim (all heads together): normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """Self-attention (with RoPE) or cross-attention (``context`` given). Keys: q, k, v, o, norm_q, norm_k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, Lk, H, D] of ``context`` [B, Lk, C]. A hook: ``wanfast.accel`` caches the
        cross-attention ones per prompt and passes them back to ``forward`` as ``context``."""
        context = context.to(self.k.weight.dtype)
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        return k, self.v(context).unflatten(-1, (self.num_heads, -1))

    def forward(
        self,
        x: Tensor,
        context: Tensor | tuple[Tensor, Tensor] | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        # x [B, Lq, C]; context: text [B, Lk, C], or its ``kv(context)``, or None (self-attention)
        # -> [B, Lq, C] in the weight dtype
        dtype = self.q.weight.dtype
        x = x.to(dtype)
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))  # [B, Lq, H, D]
        k, v = context if isinstance(context, tuple) else self.kv(x if context is None else context)
        if rope is not None:
            q, k = apply_rope(q, *rope).to(dtype), apply_rope(k, *rope).to(dtype)
        return self.o(attention(q, k, v, self_attention=context is None).flatten(2))


class WanBlock(nn.Module):
    """One transformer block: modulated self-attn, cross-attn to the text, modulated GELU-tanh FFN.

    Official names: norm1 / norm2 are parameter-free; norm3 is the affine cross-attention norm.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps)
        self.self_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = LayerNorm(dim, cfg.eps, affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self, x: Tensor, e: Tensor | PerToken, context: Tensor, rope: tuple[Tensor, Tensor]
    ) -> Tensor:
        # x [B, l, C] (float32 after the first gate); context [B, text_len, C]; e float32: [B, 6, C] (one
        # timestep per sample) or PerToken(table [U, 6, C], index [B, l]) (one per token).
        # Rows of modulation + e: 0 shift, 1 scale, 2 gate, 3 ffn shift, 4 ffn scale, 5 ffn gate, each
        # [B, 1, C] (broadcast over the tokens) or [B, l, C].
        mod = modulation_rows(self.modulation, e)
        y = self.self_attn(self.norm1(x).float() * (1 + mod(1)) + mod(0), rope=rope)
        x = x + y * mod(2)  # float32 gate: the residual stream is float32 from here on, as official
        x = x + self.cross_attn(self.norm3(x), context)
        h = self.norm2(x).float() * (1 + mod(4)) + mod(3)
        return x + self.ffn(h.to(self.ffn[0].weight.dtype)) * mod(5)


class Head(nn.Module):
    """Output head: 2-way modulated parameter-free LayerNorm then Linear, in float32 (official autocast)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor | PerToken) -> Tensor:
        # x [B, l, C]; e float32, the time embedding (not its projection): [B, C] or PerToken(table [U, C],
        # index [B, l]) -> [B, l, out_dim*prod(p)]. Rows 0 shift, 1 scale: [B, 1, C] or [B, l, C].
        e = PerToken(e.table[:, None], e.index) if isinstance(e, PerToken) else e[:, None]  # K = 1 -> 2 rows
        mod = modulation_rows(self.modulation, e)
        return _linear_fp32(self.head, self.norm(x).float() * (1 + mod(1)) + mod(0))


class WanDiT(nn.Module):
    """Wan2.2 DiT. forward(x [B, in_dim, F, H, W], t, context) -> [B, out_dim, F, H, W] float32, with t
    [B] or per token ([B, L] or ``PerToken``; L = f*h*w patch tokens of x; a batch of 1 is broadcast)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the Linear layers (modulation tables may be kept in float32 by the loader)."""
        return self.patch_embedding.weight.dtype

    def pad_context(self, context: Tensor | list[Tensor]) -> Tensor:
        """Text states [B, L, text_dim] or a list of [L_i, text_dim] -> [B, text_len, text_dim], zero-padded.

        Padded rows go through the text MLP and are attended to (official t2v: context_lens=None).
        """
        n = self.cfg.text_len
        rows = list(context.unbind(0)) if isinstance(context, Tensor) else list(context)
        for u in rows:
            if u.ndim != 2 or u.shape[0] > n:
                raise ValueError(f"context rows must be [L <= {n}, text_dim], got {tuple(u.shape)}")
        return torch.stack([F.pad(u, (0, 0, 0, n - u.shape[0])) for u in rows])

    def embed_text(self, context: Tensor | list[Tensor], device: torch.device) -> Tensor:
        """Text states -> [B, text_len, C], weight dtype. A hook: ``wanfast.accel`` caches it per prompt."""
        return self.text_embedding(self.pad_context(context).to(device=device, dtype=self.dtype))

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        """RoPE (cos, sin) [L, D/2] of a patch grid. A hook: ``wanfast.accel`` caches it per grid."""
        return rope_freqs(self.cfg, grid, device)

    def time_embed(self, t: Timesteps) -> tuple[Tensor, Tensor] | tuple[PerToken, PerToken]:
        """t [T] (T = B, or 1 for one timestep shared by the batch) -> (e [T, C], e0 [T, 6, C]), float32.
        Per token, t [B, L] or PerToken(values [U], index [B, L]) -> (PerToken(e [U, C], index),
        PerToken(e0 [U, 6, C], index)): the MLPs run on the U distinct values only.
        A hook: ``wanfast.accel`` reuses it within a step (the CFG pair gets the same ``t`` object);
        Ulysses keeps this rank's part of the index."""
        if isinstance(t, Tensor) and t.ndim == 2:
            t = factor_timesteps(t)
        if isinstance(t, PerToken):
            e, e0 = self._time_mlp(t.table)
            return PerToken(e, t.index), PerToken(e0, t.index)
        return self._time_mlp(t)

    def _time_mlp(self, t: Tensor) -> tuple[Tensor, Tensor]:
        # t [T] (or a scalar) -> e [T, C], e0 [T, 6, C], float32
        e = sinusoidal_embedding(t.reshape(-1), self.cfg.freq_dim)
        for layer in self.time_embedding:
            e = _linear_fp32(layer, e) if isinstance(layer, nn.Linear) else layer(e)
        e0 = _linear_fp32(self.time_projection[1], F.silu(e))
        return e, e0.unflatten(1, (6, self.cfg.dim))

    def time_inputs(
        self, t: Timesteps, batch: int, tokens: int
    ) -> tuple[Tensor, Tensor] | tuple[PerToken, PerToken]:
        """The forward's (e, e0) for the head and the blocks: [B, C] and [B, 6, C], or per token
        PerToken(e [U, C], index [B, l]) and PerToken(e0 [U, 6, C], index). ``t`` is on the device;
        ``tokens`` = L, the patch tokens of the whole latent (a per-token ``t`` must have them all)."""
        if isinstance(t, PerToken) or t.ndim == 2:
            shape = tuple((t.index if isinstance(t, PerToken) else t).shape)
            if len(shape) != 2 or shape[0] not in (1, batch) or shape[1] != tokens:
                raise ValueError(
                    f"per-token timesteps must be [{batch}, {tokens}] (B, L = f*h*w), got {shape}"
                )
        e, e0 = self.time_embed(t)
        if isinstance(e0, PerToken):
            index = e0.index.expand(batch, -1)  # [B, l]
            return PerToken(e.table, index), PerToken(e0.table, index)
        return e.expand(batch, -1), e0.expand(batch, -1, -1)

    def forward(self, x: Tensor, t: Timesteps, context: Tensor | list[Tensor]) -> Tensor:
        B, _, F_, H, W = x.shape
        pt, ph, pw = self.cfg.patch_size
        if F_ % pt or H % ph or W % pw:
            raise ValueError(
                f"latent size {(F_, H, W)} is not divisible by the patch size {self.cfg.patch_size}"
            )
        grid = (F_ // pt, H // ph, W // pw)
        dtype = self.dtype

        x = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2)  # [B, L, C], L = f*h*w
        # float32: [B, C], [B, 6, C]; or per token PerToken([U, C] / [U, 6, C], index [B, L])
        e, e0 = self.time_inputs(as_timesteps(t, x.device), B, math.prod(grid))
        ctx = self.embed_text(context, x.device)  # [B, text_len, C]
        rope = self.rope(grid, x.device)

        for block in self.blocks:
            x = block(x, e0, ctx, rope)
        x = self.head(x, e)  # [B, L, out_dim * pt*ph*pw] float32
        return self.unpatchify(x, grid)

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, f*h*w, pt*ph*pw*c] -> [B, c, f*pt, h*ph, w*pw] (patch channel order (pt, ph, pw, c))."""
        f, h, w = grid
        pt, ph, pw = self.cfg.patch_size
        x = x.reshape(x.shape[0], f, h, w, pt, ph, pw, self.cfg.out_dim)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, c, f, pt, h, ph, w, pw]
        return x.reshape(x.shape[0], self.cfg.out_dim, f * pt, h * ph, w * pw).float()
