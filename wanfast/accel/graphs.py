"""CUDA graphs for the whole DiT forward: one capture per input signature, replayed every step.

A captured graph replays every kernel of the forward with one launch, removing the Python and launch
overhead (about 1,200 kernels per forward at 40 blocks). That matters when a forward is short (small
latents, few tokens); at 480p a forward takes seconds and the saving is within noise, hence off by default.

Each call copies its inputs (x [B, C, F, H, W], t, the padded text) into the capture's static buffers,
replays, and returns a copy of the static output (the CFG pair calls twice per step; the second replay
would overwrite the first's output). Per-token timesteps [B, L] are factored (``torch.unique``, a host
sync a capture cannot hold) before the replay: the graph takes the distinct values [U] and the index
[B, L], and U is part of the signature (1 or 2 in the TI2V pipeline). A ``PerToken`` ``t`` needs no
factoring.

The caches of ``caches.py`` cannot work inside a graph: a capture bakes in whatever a cache returned at
capture time, while the static buffers change contents, not identity. The wrapper therefore disables the
wrapped DiT's caches; the graph recomputes RoPE, the time and text embeddings and the text K/V with its
own kernels on every replay (at 480p, about 0.3% of a forward's FLOPs). A disabled cross-K/V cache still
hands each block its (k, v), so blocks compiled with the cache on are reused, not recompiled.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wanfast.accel.caches import caches_of
from wanfast.models.dit import PerToken, Timesteps, as_timesteps, factor_timesteps

Capture = Callable[[Callable[[], Tensor]], tuple[Tensor, Callable[[], None]]]


def capture_cuda(fn: Callable[[], Tensor], warmup: int = 1) -> tuple[Tensor, Callable[[], None]]:
    """Capture ``fn`` (reading static buffers) in a CUDA graph: returns its static output and ``replay``.

    Warm-up runs on a side stream first, so lazy work (compilation, cuDNN plans, allocator growth) happens
    outside the capture, as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return out, graph.replay


@dataclass
class _Graph:
    inputs: list[Tensor]  # static buffers: x, t (or per token: values [U], index [B, L]), padded text
    output: Tensor
    replay: Callable[[], None]


class CUDAGraphDiT(nn.Module):
    """Wraps a DiT; ``forward(x, t, context)`` as the DiT's, served from captured graphs (LRU of
    ``max_graphs`` signatures; each holds its own memory pool). ``capture`` is injectable for tests."""

    def __init__(self, dit: nn.Module, max_graphs: int = 2, capture: Capture = capture_cuda):
        super().__init__()
        self.dit, self.max_graphs, self.capture = dit, max_graphs, capture
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.captures = 0
        for cache in caches_of(dit):
            cache.enabled = False

    @property
    def cfg(self):
        return self.dit.cfg

    @property
    def dtype(self) -> torch.dtype:
        return self.dit.dtype

    @staticmethod
    def signature(inputs: list[Tensor]) -> tuple:
        return tuple((tuple(u.shape), u.dtype, u.device) for u in inputs)

    @torch.no_grad()  # a replay records no autograd
    def forward(self, x: Tensor, t: Timesteps, context: Tensor | list[Tensor]) -> Tensor:
        # Text padded to [B, text_len, text_dim] first (the DiT pads it anyway): prompts of any length, the
        # CFG pair's included, then share one graph.
        t = as_timesteps(t, x.device)
        if isinstance(t, Tensor) and t.ndim == 2:
            t = factor_timesteps(t)  # outside the graph: the data-dependent size syncs with the host
        times = list(t) if isinstance(t, PerToken) else [t]  # [t] or [values, index]
        inputs = [x, *times, self.dit.pad_context(context)]
        key = self.signature(inputs)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(inputs)
            self.graphs[key] = graph
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        for buf, u in zip(graph.inputs, inputs, strict=True):
            buf.copy_(u)
        graph.replay()
        return graph.output.clone()

    def _capture(self, inputs: list[Tensor]) -> _Graph:
        # Normal (not inference) tensors: copy_ into them works both in and out of inference mode.
        with torch.inference_mode(False):
            static = [u.clone() for u in inputs]
        sx, *st, sctx = static
        st = PerToken(*st) if len(st) == 2 else st[0]
        output, replay = self.capture(lambda: self.dit(sx, st, sctx))
        self.captures += 1
        return _Graph(static, output, replay)
