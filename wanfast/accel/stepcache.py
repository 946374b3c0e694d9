"""Step caching (lossy, opt-in): skip a DiT forward while its first block's input has barely changed.

Between neighbouring denoising steps the blocks of a DiT add nearly the same thing to the residual stream;
how much the first block's *modulated input* moved is a cheap proxy for how much that sum would move.
Per call of an expert on one guidance branch, the cached forward:

1. runs the cheap front of the model: patch embedding ``x0`` [B, l, C], time embedding (e [B, C],
   e0 [B, 6, C]; per token, ``PerToken`` tables with the index [B, l]) and block 0's modulated input
   ``m = norm1(x0) * (1 + scale) + shift`` (block 0's modulation + e0, rows 1 and 0, per sample or per
   token), in the weight dtype, as block 0's self-attention consumes it;
2. measures ``rel = sum|m - m_prev| / sum|m_prev|`` (= the ratio of the means) against the previous
   call's ``m`` on the same (expert, branch), and adds it to an accumulator (TeaCache style: the path
   length since the last computed forward, an upper bound on the direct distance). Comparing against the
   last *computed* step's ``m`` and also accumulating would count an early change again in every later
   step's term, so ``m_prev`` is the previous call's, computed or skipped;
3. accumulator < threshold: skip the blocks, return ``head(x0 + R)`` with ``R`` [B, l, C] float32 =
   (stream after the last block) - (stream after the patch embedding) of the last computed forward.
   Otherwise run every block, refresh ``R``, reset the accumulator.

A forward is always computed on an (expert, branch)'s first call (no ``R`` yet) and at the request's
final timestep (its prediction is the output's fine detail, and it costs one forward per branch). The
step's timestep is t[0] for t [B], and the largest value for per-token timesteps (TI2V image mode holds
the first frame's tokens at 0; the others carry the step's t).
No per-model rescaling polynomial is fitted: the threshold applies to the raw accumulated ``rel``.

Branches are named explicitly, not by counting calls: ``WanPipeline.run`` passes the cond and uncond
context objects (the same two lists every step, whoever calls the model: ``guided_prediction``, the
CFG-parallel runtime, or a truncated-guidance step with cond alone) and the cache looks the context up by
identity (holding the objects so their ids stay unique). An unknown context runs the plain forward.

State lives in the ``StepCache`` of one request (``WanPipeline.run`` builds it, so every request starts
empty), keyed by (expert, branch). When an expert makes its first call, the other expert's states are
dropped: each expert runs one contiguous stretch of a request, and at A14B 720p (L = 75,600 tokens,
C = 5120) a state is R 1.5 GB float32 + m_prev 0.8 GB bf16, two branches held at once.

Composition: the cached forward is an instance attribute over the plain ``WanDiT.forward`` (installed for
the request by ``installed``, removed after), so ``OffloadedExpert`` (offload.py) still activates its
expert first, blocks are called as modules (the cross-K/V pre-hooks, the block-offload streamer and the
regionally compiled block forwards all run as usual), and ``dit.time_embed`` / ``embed_text`` / ``rope``
are whatever accel or Ulysses put there. A ``CUDAGraphDiT`` replays the whole forward from a capture, with
no host decision possible inside: that combination is a ``ConfigError``. Block 0's modulation table is
copied at install time (block offload may hold it in host memory until block 0 runs).

Ulysses: each rank holds l = ceil(L / N) tokens (the last rank zero-padded). The sums above are taken over
the rank's real tokens and all-reduced over the sequence group before dividing, so every rank of a group
takes the same decision (a skipped forward runs no collective; a computed one runs them all). Under
CFG-parallel each branch's group decides for itself: branches are cached separately anyway.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import Tensor, nn

from wanfast.accel.graphs import CUDAGraphDiT
from wanfast.accel.offload import OffloadedExpert
from wanfast.config import ConfigError
from wanfast.models.dit import PerToken, Timesteps, WanDiT, as_timesteps, modulation_rows


@dataclass
class _State:
    """One (expert, branch): the previous call's block-0 input and the last computed residual."""

    m_prev: Tensor  # [B, l, C] weight dtype
    residual: Tensor  # [B, l, C] float32
    acc: float = 0.0  # accumulated rel since the last computed forward


@dataclass(frozen=True)
class Decision:
    expert: str
    branch: str
    t: float | None  # the timestep (None when it was not read: first call of the branch)
    computed: bool
    acc: float  # the accumulated rel the decision compared (0.0 when forced)


class StepCache:
    """Per-request step-cache state and counters. ``branches`` maps a name ("cond", "uncond") to the
    context object the model is called with for it; ``force_t`` are timesteps always computed; ``group``
    is the Ulysses sequence group (None: the whole sequence is local)."""

    def __init__(
        self,
        threshold: float,
        branches: Mapping[str, object],
        force_t: tuple[float, ...] = (),
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if not threshold > 0:
            raise ValueError(f"a StepCache needs a threshold > 0 (0 = off: install nothing), got {threshold}")
        self.threshold, self.group = float(threshold), group
        self._branches = {id(obj): (name, obj) for name, obj in branches.items()}  # obj held: id unique
        self.force_t = frozenset(float(t) for t in force_t)
        self.states: dict[tuple[str, str], _State] = {}
        self.counts: dict[tuple[str, str], list[int]] = {}  # (expert, branch) -> [computed, skipped]
        self.decisions: list[Decision] = []  # one per cached call, in order (2 x steps entries at most)
        self._mod0: dict[str, Tensor] = {}  # expert -> block 0's (shift, scale) table [1, 2, C] float32

    def branch_of(self, context: object) -> str | None:
        hit = self._branches.get(id(context))
        return hit[0] if hit is not None and hit[1] is context else None

    # --- the decision ------------------------------------------------------------------------------
    def _valid_tokens(self, local: int, total: int) -> int:
        """How many of this rank's ``local`` tokens are real (Ulysses pads the last shard with zeros)."""
        if self.group is None:
            return local
        rank = dist.get_rank(self.group)
        return max(0, min(local, total - rank * local))

    def decide(self, expert: str, branch: str, m: Tensor, t: Timesteps, tokens: int) -> bool:
        """True: compute this forward. ``m`` [B, l, C] is block 0's modulated input, ``tokens`` = L."""
        key = (expert, branch)
        state = self.states.get(key)
        if state is None or state.m_prev.shape != m.shape:
            self.states.pop(key, None)  # the forward stores a fresh state
            for other in [k for k in self.states if k[0] != expert]:  # that expert's stretch is over
                del self.states[other]
            self._record(Decision(expert, branch, None, True, 0.0))
            return True
        v = self._valid_tokens(m.shape[1], tokens)
        cur, prev = m[:, :v], state.m_prev[:, :v]  # views; the sums accumulate in float32, no fp32 copies
        f32 = torch.float32
        sums = torch.stack([(cur - prev).abs().sum(dtype=f32), prev.abs().sum(dtype=f32)])  # [2]
        if self.group is not None:  # every rank of the group sees the same totals, so decides alike
            dist.all_reduce(sums, group=self.group)
        num, den, t_val = torch.cat([sums, _step_t(t).to(sums)]).tolist()  # the one host sync
        acc = state.acc + (num / den if den > 0 else math.inf)
        computed = t_val in self.force_t or not acc < self.threshold
        self._record(Decision(expert, branch, t_val, computed, 0.0 if t_val in self.force_t else acc))
        state.m_prev, state.acc = m, (0.0 if computed else acc)
        return computed

    def _record(self, d: Decision) -> None:
        self.decisions.append(d)
        self.counts.setdefault((d.expert, d.branch), [0, 0])[0 if d.computed else 1] += 1

    def skipped(self) -> dict[str, int]:
        """Forwards skipped per expert."""
        out: dict[str, int] = {}
        for (expert, _), (_, s) in self.counts.items():
            out[expert] = out.get(expert, 0) + s
        return out

    # --- the forward -------------------------------------------------------------------------------
    def block0_input(self, dit: WanDiT, expert: str, x0: Tensor, e0: Tensor | PerToken) -> Tensor:
        """Block 0's modulated self-attention input [B, l, C] in the weight dtype, as ``WanBlock`` makes
        it: norm1(x0).float() * (1 + scale) + shift, (shift, scale) = rows 0, 1 of modulation + e0 (e0
        [B, 6, C], or per token PerToken(table [U, 6, C], index [B, l]))."""
        mod = self._mod0[expert]
        if mod.device != x0.device:  # moved once per request
            mod = self._mod0[expert] = mod.to(x0.device)
        e0 = PerToken(e0.table[:, :2], e0.index) if isinstance(e0, PerToken) else e0[:, :2]
        rows = modulation_rows(mod, e0)  # k -> [B, 1, C] or [B, l, C], float32
        return (dit.blocks[0].norm1(x0).float() * (1 + rows(1)) + rows(0)).to(dit.dtype)

    def forward(self, dit: WanDiT, expert: str, x: Tensor, t: Timesteps, context) -> Tensor:
        """``dit.forward`` with step caching: x [B, in_dim, F, H, W] -> [B, out_dim, F, H, W] float32."""
        branch = self.branch_of(context)
        B, _, F_, H, W = x.shape
        pt, ph, pw = dit.cfg.patch_size
        if branch is None or F_ % pt or H % ph or W % pw:  # not a request's branch, or a bad shape
            return type(dit).forward(dit, x, t, context)  # (the plain forward raises on a bad shape)
        grid = (F_ // pt, H // ph, W // pw)

        # The plain forward's front, in its order: patch embedding, time embedding.
        x0 = dit.patch_embedding(x.to(dit.dtype)).flatten(2).transpose(1, 2)  # [B, l, C] (l = L unsplit)
        t = as_timesteps(t, x0.device)
        e, e0 = dit.time_inputs(t, B, math.prod(grid))  # float32 [B, C], [B, 6, C] (or per token)
        m = self.block0_input(dit, expert, x0, e0)
        if self.decide(expert, branch, m, t, math.prod(grid)):
            ctx = dit.embed_text(context, x0.device)  # [B, text_len, C]
            rope = dit.rope(grid, x0.device)
            h = x0
            for block in dit.blocks:
                h = block(h, e0, ctx, rope)
            residual = h.float() - x0  # [B, l, C] float32 (x0 promoted on the fly, not copied)
            state = self.states.get((expert, branch))
            if state is None:  # first call (decide dropped any stale state)
                self.states[(expert, branch)] = _State(m, residual)
            else:  # decide already moved m_prev and reset acc
                state.residual = residual
        else:
            h = self.states[(expert, branch)].residual + x0  # float32 [B, l, C]
        return dit.unpatchify(dit.head(h, e), grid)


def _step_t(t: Timesteps) -> Tensor:
    """The step's timestep, [1]: t[0] of a [B] t; the largest of per-token timesteps."""
    if isinstance(t, PerToken):
        return t.table.max().reshape(1)
    return t.max().reshape(1) if t.ndim == 2 else t.reshape(-1)[:1]


def _plain_dit(module: nn.Module) -> WanDiT:
    """The ``WanDiT`` inside an expert module (``OffloadedExpert`` wraps it); refuses what cannot work."""
    dit = module.dit if isinstance(module, OffloadedExpert) else module
    if isinstance(dit, CUDAGraphDiT):
        raise ConfigError(
            "step caching cannot be combined with cuda_graphs: the captured graph replays the whole "
            "forward, leaving no place for the per-step skip decision"
        )
    if not isinstance(dit, WanDiT):
        raise ConfigError(f"step caching needs WanDiT experts, got {type(dit).__name__}")
    if "forward" in dit.__dict__:
        raise ConfigError("step caching: this DiT's forward is already replaced (a step cache installed?)")
    return dit


@contextmanager
def installed(experts: Mapping[str, nn.Module], cache: StepCache | None) -> Iterator[StepCache | None]:
    """Route every expert's ``WanDiT.forward`` through ``cache`` for the ``with`` block (a request); no
    ``cache``: install nothing, so the plain forward runs untouched."""
    if cache is None:
        yield None
        return
    dits = {name: _plain_dit(module) for name, module in experts.items()}
    try:
        for name, dit in dits.items():
            # (shift, scale) rows of block 0's table, copied now: block offload may stream block 0 in later
            cache._mod0[name] = dit.blocks[0].modulation.detach()[:, :2].float().clone()
            dit.forward = partial(cache.forward, dit, name)  # instance attribute over the class method
        yield cache
    finally:
        for dit in dits.values():
            dit.__dict__.pop("forward", None)


class ForwardCounter:
    """Counts the calls of each expert (one per guidance pass this process runs); ``experts`` are the
    wrapped callables to hand to the sampling loop. With or without a cache, nothing else changes."""

    def __init__(self, experts: Mapping[str, Callable]) -> None:
        self.calls = dict.fromkeys(experts, 0)
        # looked up at each call, not now: an expert may still be loading (wanfast.experts) until its first step
        self._models = experts
        self.experts = {name: partial(self._call, name) for name in experts}

    def _call(self, name: str, *args, **kwargs) -> Tensor:
        self.calls[name] += 1
        return self._models[name](*args, **kwargs)

    def summary(self, cache: StepCache | None = None) -> dict[str, int]:
        """{"computed", "skipped", and "<expert>_computed" / "<expert>_skipped" per expert}."""
        skipped = cache.skipped() if cache is not None else {}
        out = {"computed": 0, "skipped": 0}
        for name, n in self.calls.items():
            s = skipped.get(name, 0)
            out[f"{name}_computed"], out[f"{name}_skipped"] = n - s, s
            out["computed"] += n - s
            out["skipped"] += s
        return out
