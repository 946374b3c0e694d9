"""Spatially tiled VAE decode across ranks: overlapping tiles along the longer latent axis, blended.

The decoder is causal in time (each frame depends on all earlier ones), so time is not split; space is.
Rank i decodes the latent slab [a_i - overlap, b_i + overlap) of its core [a_i, b_i) (clipped at the
borders); the decoded slabs are all-gathered and every output pixel is the weighted mean of the slabs
covering it, with linear ramps across each 2*overlap-row seam (weights of the two neighbours sum to 1).

The decoder's one attention block (middle, latent resolution, over all pixels of a frame) is global: its
input is all-gathered from the tile cores (the 3 latent rows of convs before it fit inside ``overlap``
>= 3, so the cores are exact) and every rank attends over the whole frame, then keeps its tile (hooks on
that block, installed for the call). What is left is the receptive field of the convs after it (~14
latent rows): the seams differ from a single decode by a bounded amount that tests/test_parallel.py
measures and asserts. ``overlap`` >= the axis length makes every tile
the whole frame and the result equal to the single decode. Needs at least one latent row per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from wanfast.models.vae import AttentionBlock

DEFAULT_OVERLAP = 8  # latent rows of context each side (64 pixels at stride 8); see tests/test_parallel.py


def tiles(n: int, parts: int, overlap: int) -> list[tuple[int, int]]:
    """Latent [lo, hi) of each tile: cores split ``n`` evenly, widened by ``overlap`` and clipped."""
    cuts = [i * n // parts for i in range(parts + 1)]
    return [(max(0, a - overlap), min(n, b + overlap)) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def ramp(lo: int, hi: int, n: int, overlap: int, stride: int, device: torch.device) -> Tensor:
    """Blend weight [(hi - lo) * stride] of a tile along the split axis, in (0, 1]: 1 inside, falling
    linearly to 0 across the 2*overlap latent rows of each seam (no ramp at the frame border)."""
    y = torch.arange(lo * stride, hi * stride, device=device, dtype=torch.float32) + 0.5
    width = max(2 * overlap * stride, 1)
    w = torch.ones_like(y)
    if lo > 0:
        w = torch.minimum(w, (y - lo * stride) / width)
    if hi < n:
        w = torch.minimum(w, (hi * stride - y) / width)
    return w


class _GlobalAttention:
    """Hooks on the decoder's ``AttentionBlock``: tile in, whole frame attended, tile out."""

    def __init__(
        self, spans: list[tuple[int, int]], cores: list[tuple[int, int]], axis: int, rank: int, group
    ):
        self.spans, self.cores, self.axis, self.rank, self.group = spans, cores, axis, rank, group

    def gather(self, module: nn.Module, args: tuple) -> tuple[Tensor]:
        # x [B, C, t, *, *] of this tile -> the whole frame, assembled from every rank's core rows
        (x,) = args
        lo, a, b = self.spans[self.rank][0], *self.cores[self.rank]
        core = x.narrow(self.axis, a - lo, b - a)
        longest = max(b - a for a, b in self.cores)
        pad = [0, 0] * (4 - self.axis) + [0, longest - core.shape[self.axis]]
        parts = [torch.empty_like(F.pad(core, pad)) for _ in self.cores]
        dist.all_gather(parts, F.pad(core, pad).contiguous(), group=self.group)
        full = [p.narrow(self.axis, 0, b - a) for p, (a, b) in zip(parts, self.cores, strict=True)]
        return (torch.cat(full, self.axis),)

    def scatter(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        lo, hi = self.spans[self.rank]
        return out.narrow(self.axis, lo, hi - lo)


def parallel_decode(
    vae: nn.Module, latents: Tensor, group: dist.ProcessGroup | None = None, overlap: int = DEFAULT_OVERLAP
) -> Tensor:
    """``vae.decode`` of latents [B, z, F', h, w] split over the ranks of ``group``; every rank returns
    the blended video [B, 3, F, s*h, s*w] (fp32, as ``decode``; s = ``vae.cfg.spatial_stride``: 8 for the
    Wan2.1 VAE, 16 for the Wan2.2 one, whose decoder has the same single attention block)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    axis = 3 if latents.shape[3] >= latents.shape[4] else 4  # split the longer of h (3), w (4)
    n = latents.shape[axis]
    if overlap < 3 and overlap < n:
        raise ValueError("overlap must be >= 3 latent rows (the convs before the attention block)")
    if n < world:
        raise ValueError(f"cannot split {n} latent rows over {world} ranks")
    spans, cores = tiles(n, world, overlap), tiles(n, world, 0)
    stride = vae.cfg.spatial_stride
    lo, hi = spans[rank]
    hooks = _GlobalAttention(spans, cores, axis, rank, group)
    attn = [m for m in vae.decoder.modules() if isinstance(m, AttentionBlock)]
    handles = [h for m in attn for h in (m.register_forward_pre_hook(hooks.gather),
                                         m.register_forward_hook(hooks.scatter))]  # fmt: skip
    try:
        mine = vae.decode(latents.narrow(axis, lo, hi - lo))  # [B, 3, F, *, *]: the tile along ``axis``
    finally:
        for h in handles:
            h.remove()
    # all_gather needs equal shapes: pad every tile to the longest one along the axis.
    longest = max(b - a for a, b in spans) * stride
    pad = [0, 0] * (4 - axis) + [0, longest - mine.shape[axis]]
    buf = F.pad(mine, pad).contiguous()
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)

    out_shape = list(buf.shape)
    out_shape[axis] = n * stride
    out = torch.zeros(out_shape, dtype=buf.dtype, device=buf.device)
    total = torch.zeros(n * stride, dtype=torch.float32, device=buf.device)
    view = [1] * buf.ndim
    view[axis] = -1
    for (lo, hi), part in zip(spans, parts, strict=True):
        w = ramp(lo, hi, n, overlap, stride, buf.device)
        out.narrow(axis, lo * stride, w.numel()).add_(part.narrow(axis, 0, w.numel()) * w.view(view))
        total[lo * stride : hi * stride] += w
    return out / total.view(view)
