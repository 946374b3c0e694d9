"""Caches for the DiT's input-derived tensors, installed on a built ``WanDiT`` through its hook methods.

- ``RopeCache`` (per shape): ``dit.rope(grid, device)`` -> the same (cos, sin) [L, D/2] tables for a grid.
- ``CrossKVCache`` (per request): ``dit.embed_text`` -> the text embedding [B, text_len, C] of a prompt,
  and, through a forward pre-hook on each block, that block's cross-attention K/V [B, text_len, H, D],
  handed to the block as its ``context`` (``Attention`` takes a precomputed (k, v)). The pre-hook runs
  outside ``block.forward``, so a compiled block sees plain tensor inputs and never the cache's logic.
- ``TimeEmbedCache`` (per request): ``dit.time_embed(t)`` -> the last (e, e0) again when the same ``t``
  comes back, i.e. for the second pass of a CFG step (the pipeline passes one ``t`` to both). ``t`` is a
  tensor ([B], or [B, L] per token: then the hit also skips ``torch.unique`` and its host sync) or a
  ``PerToken`` (the object and both its tensors must be the same).

Per-request caches key on tensor identity, not values: comparing values of device tensors would need a
host sync. A key holds the tensor itself (so its id cannot be reused while the entry lives) and its
version counter, so an in-place change misses; inference tensors have no version counter, and for those
``reset_caches`` at the start of each request is the guard. Every cache is bounded (LRU).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from wanfast.models.dit import Timesteps, WanDiT

Rope = tuple[Tensor, Tensor]


def _version(t: Tensor | tuple) -> int | None | tuple:
    """The version counter of a tensor (None for an inference tensor), or those of a tuple's tensors."""
    if isinstance(t, tuple):
        return tuple(_version(u) for u in t)
    return None if t.is_inference() else t._version


class Cache:
    """Base: hit/miss counters, ``clear``, whether ``reset_caches`` clears it per request, and ``enabled``
    (a disabled cache computes every time: ``CUDAGraphDiT`` disables the caches of the DiT it captures)."""

    per_request = True

    def __init__(self) -> None:
        self.hits = self.misses = 0
        self.enabled = True

    def clear(self) -> None:
        raise NotImplementedError


def attach(module: nn.Module, cache: Cache) -> Cache:
    module.__dict__.setdefault("_accel_caches", []).append(cache)
    return cache


def caches_of(module: nn.Module) -> list[Cache]:
    """Every cache installed on ``module`` or its submodules."""
    return [c for m in module.modules() for c in m.__dict__.get("_accel_caches", ())]


class RopeCache(Cache):
    """(cos, sin) per (grid, device). Not per request: a table depends on the shape only."""

    per_request = False

    def __init__(self, compute: Callable[[tuple[int, int, int], torch.device], Rope], max_size: int = 8):
        super().__init__()
        self.compute, self.max_size = compute, max_size
        self.tables: OrderedDict[tuple, Rope] = OrderedDict()

    def __call__(self, grid: tuple[int, int, int], device: torch.device) -> Rope:
        if not self.enabled:
            return self.compute(grid, device)
        key = (tuple(grid), torch.device(device))
        if key in self.tables:
            self.hits += 1
            self.tables.move_to_end(key)
            return self.tables[key]
        self.misses += 1
        self.tables[key] = self.compute(grid, device)
        if len(self.tables) > self.max_size:
            self.tables.popitem(last=False)
        return self.tables[key]

    def clear(self) -> None:
        self.tables.clear()


class TimeEmbedCache(Cache):
    """The last (e [T, C], e0 [T, 6, C]) (per token: the two ``PerToken``) for the last ``t`` seen (size 1:
    one step at a time)."""

    def __init__(self, compute: Callable[[Timesteps], tuple]):
        super().__init__()
        self.compute = compute
        self.last: tuple[Timesteps, object, tuple] | None = None

    def __call__(self, t: Timesteps) -> tuple:
        if not self.enabled:
            return self.compute(t)
        if self.last is not None and self.last[0] is t and self.last[1] == _version(t):
            self.hits += 1
            return self.last[2]
        self.misses += 1
        out = self.compute(t)
        self.last = (t, _version(t), out)
        return out

    def clear(self) -> None:
        self.last = None


@dataclass
class _Prompt:
    raw: tuple[Tensor, ...]  # the caller's text tensors, held so their ids stay unique
    ctx: Tensor  # text embedding [B, text_len, C]
    kv: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # block index -> k, v [B, Lk, H, D]


class CrossKVCache(Cache):
    """Text embedding and every block's cross-attention K/V, per prompt (LRU over ``max_prompts``).

    Memory per prompt at A14B dims (512 tokens, C 5120, 40 blocks, bf16): (1 + 2 * 40) * 512 * 5120 * 2 B
    = 425 MB; a request holds two (prompt and negative prompt) per expert.
    """

    def __init__(self, dit: WanDiT, max_prompts: int = 4):
        super().__init__()
        self.compute, self.max_prompts = dit.embed_text, max_prompts
        self.prompts: OrderedDict[tuple, _Prompt] = OrderedDict()
        self.by_ctx: dict[int, _Prompt] = {}  # id(ctx) -> its prompt, for the block pre-hooks
        self.kv_hits = self.kv_misses = 0

    def embed_text(self, context: Tensor | list[Tensor], device: torch.device) -> Tensor:
        if not self.enabled:
            return self.compute(context, device)
        raw = (context,) if isinstance(context, Tensor) else tuple(context)
        key = (torch.device(device), tuple((id(u), _version(u)) for u in raw))
        prompt = self.prompts.get(key)
        if prompt is not None:
            self.hits += 1
            self.prompts.move_to_end(key)
            return prompt.ctx
        self.misses += 1
        prompt = _Prompt(raw, self.compute(context, device))
        self.prompts[key], self.by_ctx[id(prompt.ctx)] = prompt, prompt
        if len(self.prompts) > self.max_prompts:
            _, old = self.prompts.popitem(last=False)
            del self.by_ctx[id(old.ctx)]
        return prompt.ctx

    def pre_hook(self, index: int) -> Callable:
        """Forward pre-hook of block ``index`` (called as ``block(x, e, ctx, rope)``): replaces ctx by this
        block's (k, v), cached when ctx is a cached prompt's. The block always gets a (k, v), so a compiled
        block sees the same inputs whether the cache hit, missed or is disabled."""

        def hook(block: nn.Module, args: tuple) -> tuple:
            x, e, ctx, rope = args
            prompt = self.by_ctx.get(id(ctx)) if self.enabled else None
            if prompt is None or prompt.ctx is not ctx:  # disabled, or a ctx this cache did not make
                return x, e, block.cross_attn.kv(ctx), rope
            kv = prompt.kv.get(index)
            if kv is None:
                self.kv_misses += 1
                kv = prompt.kv[index] = block.cross_attn.kv(ctx)
            else:
                self.kv_hits += 1
            return x, e, kv, rope

        return hook

    def clear(self) -> None:
        self.prompts.clear()
        self.by_ctx.clear()


def cache_rope(dit: WanDiT) -> RopeCache:
    """Install a ``RopeCache`` over ``dit.rope`` (an instance attribute shadows the method)."""
    cache = RopeCache(dit.rope)
    dit.rope = cache
    return attach(dit, cache)


def cache_cross_kv(dit: WanDiT, max_prompts: int = 4) -> CrossKVCache:
    """Install a ``CrossKVCache``: over ``dit.embed_text``, plus a pre-hook on every block."""
    cache = CrossKVCache(dit, max_prompts)
    dit.embed_text = cache.embed_text
    for i, block in enumerate(dit.blocks):
        block.register_forward_pre_hook(cache.pre_hook(i))
    return attach(dit, cache)


def cache_time_embedding(dit: WanDiT) -> TimeEmbedCache:
    """Install a ``TimeEmbedCache`` over ``dit.time_embed``."""
    cache = TimeEmbedCache(dit.time_embed)
    dit.time_embed = cache
    return attach(dit, cache)
