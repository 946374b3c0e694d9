"""Projection fusion: one GEMM for self-attention's Q, K, V and one for cross-attention's K, V.

Each block's ``Attention`` modules are replaced by fused equivalents whose weights are the row-wise
concatenation of the originals (``wqkv.weight = cat([q.weight, k.weight, v.weight])``, [3C, C]). The
original q/k/v (or k/v) Linears are dropped, so their memory is freed block by block: the peak grows by
one block's projections at most. Output norms, ``o`` and the RMSNorms are moved over unchanged.

The math is the plain ``Attention`` one; only the GEMM count changes (RMSNorm is over the full C of each
of Q and K, so it applies after the split).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wanfast.attention import attention
from wanfast.models.dit import Attention, WanDiT, apply_rope


@torch.no_grad()
def concat_linears(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing ``cat([l(x) for l in linears], -1)``: weights [sum(out_i), in] concatenated."""
    first = linears[0]
    out_features = sum(lin.out_features for lin in linears)
    fused = nn.Linear(first.in_features, out_features, bias=first.bias is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat([lin.weight for lin in linears]), requires_grad=False)
    if first.bias is not None:
        fused.bias = nn.Parameter(torch.cat([lin.bias for lin in linears]), requires_grad=False)
    return fused


class FusedSelfAttention(nn.Module):
    """Self-attention with RoPE; ``wqkv`` [3C, C] replaces q, k, v."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.num_heads = attn.num_heads
        self.wqkv = concat_linears(attn.q, attn.k, attn.v)
        self.o, self.norm_q, self.norm_k = attn.o, attn.norm_q, attn.norm_k

    def forward(self, x: Tensor, context: None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        # x [B, L, C] -> [B, L, C] in the weight dtype
        dtype = self.wqkv.weight.dtype
        q, k, v = self.wqkv(x.to(dtype)).chunk(3, dim=-1)  # 3 x [B, L, C]
        q = self.norm_q(q).unflatten(-1, (self.num_heads, -1))  # [B, L, H, D]
        k = self.norm_k(k).unflatten(-1, (self.num_heads, -1))
        v = v.unflatten(-1, (self.num_heads, -1))
        if rope is not None:
            q, k = apply_rope(q, *rope).to(dtype), apply_rope(k, *rope).to(dtype)
        return self.o(attention(q, k, v, self_attention=True).flatten(2))


class FusedCrossAttention(nn.Module):
    """Cross-attention to the text; ``wkv`` [2C, C] replaces k, v. Same interface as ``Attention``:
    ``kv(context)`` and a ``context`` that may be the precomputed (k, v)."""

    def __init__(self, attn: Attention):
        super().__init__()
        self.num_heads = attn.num_heads
        self.q, self.o, self.norm_q, self.norm_k = attn.q, attn.o, attn.norm_q, attn.norm_k
        self.wkv = concat_linears(attn.k, attn.v)

    def kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        # context [B, Lk, C] -> k, v [B, Lk, H, D]
        k, v = self.wkv(context.to(self.wkv.weight.dtype)).chunk(2, dim=-1)
        return self.norm_k(k).unflatten(-1, (self.num_heads, -1)), v.unflatten(-1, (self.num_heads, -1))

    def forward(self, x: Tensor, context: Tensor | tuple[Tensor, Tensor], rope: None = None) -> Tensor:
        # x [B, Lq, C] -> [B, Lq, C] in the weight dtype
        q = self.norm_q(self.q(x.to(self.q.weight.dtype))).unflatten(-1, (self.num_heads, -1))
        k, v = context if isinstance(context, tuple) else self.kv(context)
        return self.o(attention(q, k, v).flatten(2))


def fuse_projections(dit: WanDiT) -> int:
    """Swap every block's attention modules for fused ones, in place; returns the number of blocks fused.
    Blocks already fused are left alone, so applying it twice is harmless."""
    n = 0
    for block in dit.blocks:
        if isinstance(block.self_attn, Attention):
            block.self_attn = FusedSelfAttention(block.self_attn)
            block.cross_attn = FusedCrossAttention(block.cross_attn)
            n += 1
    return n
