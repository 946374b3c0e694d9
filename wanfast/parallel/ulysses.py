"""Ulysses sequence parallelism as a declared split/gather plan installed onto a built ``WanDiT``.

The plan (N = group size, L = f*h*w tokens, Lp = L rounded up to a multiple of N, l = Lp / N):

==========================  ===================================  ==============================================
where                       tensor                               what happens
==========================  ===================================  ==============================================
``patch_embedding`` output  [B, C, f, h, w] -> tokens [B, C, L]  padded to Lp, split: this rank keeps l tokens
``dit.rope(grid, device)``  cos, sin [L, D/2]                    padded and split the same way -> [l, D/2]
``dit.time_embed(t)``       per token: index [B, L] into the     padded (row 0), split the same way -> [B, l];
                            U-row time tables                    the tables are replicated
self-attention core         q, k, v [B, l, H, D]                 all-to-all -> [B, Lp, H/N, D]; k, v cut to L
                                                                 (padded keys removed), attention, all-to-all
                                                                 back -> [B, l, H, D]
``head`` output             [B, l, prod(patch)*out_dim]          all-gathered -> [B, Lp, ...], cut to L
everything else             (time/text embeddings, modulation,   replicated or token-local: no communication
                            cross-attention, FFN)
==========================  ===================================  ==============================================

The model's own forward runs unchanged: the splits are forward hooks, RoPE and the time embedding are
instance attributes over ``dit.rope`` / ``dit.time_embed`` (as ``wanfast.accel``'s caches), and the
all-to-all lives in the attention registry's self-attention slot (cross-attention and the VAE use the
default slot and pass straight through). That slot holds one torch custom op,
``wanfast::ulysses_self_attention``, which regional ``torch.compile`` (fullgraph) sees as a single opaque
node: the collectives run eagerly inside it, so the compiled blocks keep their fusions under Ulysses.
Gathering after the head moves prod(patch)*out_dim = 64 channels per token instead of dim = 5120.

``chunks`` = G >= 2 (opt-in, ``EngineSettings.ulysses_chunks``) splits each rank's H/N heads into G groups of
hg = H/(N*G) and overlaps the collectives with the kernel (``attend_overlapped``): q, k, v packed by one
copy, G input all-to-alls (q, k and v together) issued at once, then per group: wait, attention, its output
all-to-all issued. On the GPU the NCCL stream runs in(0..G-1) back to back while attention(g) runs, and
out(g) overlaps attention(g + 1). Every head meets the same kernel on the same tokens as with G = 1, so the
result is the same; chunks = 1 is the measured path (``attend``: blocking collectives).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from wanfast import attention
from wanfast.models.dit import PerToken
from wanfast.parallel.dist import check_chunks

_PREFIX = "ulysses+"
# The plan of the DiT whose forward is running: set by its patch-embedding hook, cleared by its head hook
# (both outside the compiled blocks). One slot: forwards never nest.
_CURRENT: list[UlyssesPlan | None] = [None]
_INNER: dict[str, object] = {}  # "fn": the self-attention backend function the op wraps


@torch.library.custom_op("wanfast::ulysses_self_attention", mutates_args=())
def _ulysses_self_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    # q, k, v [B, l, H, D] (this rank's tokens) -> [B, l, H, D]; outside a Ulysses forward: the kernel
    plan, inner = _CURRENT[0], _INNER["fn"]  # a registry backend: returns a tensor
    if plan is None:
        out = inner(q, k, v)
    elif plan.chunks == 1:
        out = plan.attend(inner, q, k, v)  # the measured path
    else:
        out = plan.attend_overlapped(inner, q, k, v)
    return out.contiguous()


@_ulysses_self_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])


class UlyssesPlan:
    def __init__(self, group: dist.ProcessGroup, num_heads: int, chunks: int = 1) -> None:
        self.group = group
        self.n, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_heads % self.n:
            raise ValueError(f"{num_heads} attention heads do not split over ulysses degree {self.n}")
        check_chunks(num_heads, self.n, chunks)
        self.chunks = chunks  # head groups per rank whose all-to-alls overlap the attention (1: off)
        self.seq_len = 0  # L of the forward in progress, set by the patch-embedding hook

    def padded(self, length: int) -> int:
        return -(-length // self.n) * self.n

    def shard(self, x: Tensor, dim: int) -> Tensor:
        """Pad ``x`` along ``dim`` from L to Lp (zeros at the end) and keep this rank's l = Lp/N slice."""
        length = x.shape[dim]
        pad = self.padded(length) - length
        if pad:
            widths = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, pad]
            x = F.pad(x, widths)
        return x.chunk(self.n, dim)[self.rank]

    # --- the split / gather points ---------------------------------------------------------------
    def split_tokens(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        # out [B, C, f, h, w] -> [B, C, l, 1, 1]: the model's flatten(2).transpose(1, 2) gives [B, l, C]
        _install_backend(out.device)
        _CURRENT[0] = self
        tokens = out.flatten(2)
        self.seq_len = tokens.shape[2]
        return self.shard(tokens, 2)[..., None, None]

    def split_rope(self, rope_fn):
        def rope(grid: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor]:
            cos, sin = rope_fn(grid, device)  # [L, D/2] each
            return self.shard(cos, 0), self.shard(sin, 0)

        return rope

    def split_time(self, time_fn):
        def time_embed(t):
            e, e0 = time_fn(t)  # [T, C], [T, 6, C]: replicated; or per token, PerToken with index [B, L]
            if not isinstance(e0, PerToken):
                return e, e0
            # [B, L] -> [B, l], as the tokens; padded tokens take row 0 and are cut after the head
            index = self.shard(e0.index, 1)
            return PerToken(e.table, index), PerToken(e0.table, index)

        return time_embed

    def gather_tokens(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        # out [B, l, P] -> [B, L, P]: every rank gets the whole prediction (unpatchify needs the full grid)
        _CURRENT[0] = None
        parts = [torch.empty_like(out) for _ in range(self.n)]
        dist.all_gather(parts, out.contiguous(), group=self.group)
        return torch.cat(parts, 1)[:, : self.seq_len]

    # --- self-attention: tokens <-> heads -----------------------------------------------------------
    def to_heads(self, x: Tensor) -> Tensor:
        # [B, l, H, D] -> [B, Lp, H/N, D]: send head group j to rank j, receive every rank's tokens
        b, ln, h, d = x.shape
        send = x.unflatten(2, (self.n, h // self.n)).movedim(2, 0).contiguous()  # [N, B, l, H/N, D]
        recv = torch.empty_like(send)  # recv[j] = rank j's tokens, my heads
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.movedim(0, 1).reshape(b, self.n * ln, h // self.n, d)

    def to_tokens(self, x: Tensor) -> Tensor:
        # [B, Lp, H/N, D] -> [B, l, H, D]: the inverse of to_heads
        b, lp, hn, d = x.shape
        send = x.unflatten(1, (self.n, lp // self.n)).movedim(1, 0).contiguous()  # [N, B, l, H/N, D]
        recv = torch.empty_like(send)  # recv[j] = my tokens, rank j's heads
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, lp // self.n, self.n * hn, d)

    def attend(self, inner, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = self.to_heads(q), self.to_heads(k), self.to_heads(v)
        # Padded tokens sit at the end of the sequence: dropping them as keys is an exact key mask.
        # Padded queries are computed and later discarded (gather_tokens cuts to L).
        k, v = k[:, : self.seq_len], v[:, : self.seq_len]
        return self.to_tokens(inner(q, k, v))

    def attend_overlapped(self, inner, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``attend`` with the heads in ``chunks`` groups: each group's all-to-alls are async, so on the GPU
        the input exchange of later groups and the output exchange of earlier ones overlap the kernel.
        q, k, v [B, l, H, D] -> [B, l, H, D], the same heads in the same order as ``attend``."""
        if not q.shape == k.shape == v.shape:
            raise ValueError(
                f"overlapped Ulysses packs q, k, v together: shapes {q.shape}, {k.shape}, {v.shape}"
            )
        b, ln, h, d = q.shape
        n, g = self.n, self.chunks
        hg = h // (n * g)  # heads per group; head j*(H/N) + c*hg + i is rank j's group c, head i
        # One copy packs q, k, v: send [G, N, 3, B, l, hg, D], so send[c] (group c) is contiguous and
        # send[c][j] is what rank j receives of it: my tokens of its heads j*(H/N) + c*hg + (0..hg-1)
        send = q.new_empty(g, n, 3, b, ln, hg, d)
        for i, x in enumerate((q, k, v)):
            send[:, :, i].copy_(x.unflatten(2, (n, g, hg)).permute(3, 2, 0, 1, 4, 5))  # [G, N, B, l, hg, D]
        recv = torch.empty_like(send)  # recv[c][j]: rank j's tokens of my group c
        inputs = [dist.all_to_all_single(recv[c], send[c], group=self.group, async_op=True) for c in range(g)]
        back, outputs = None, []  # back [G, N, B, l, hg, D]: back[c][j] = my tokens of rank j's group c
        for c in range(g):
            inputs[c].wait()
            # [N, 3, B, l, hg, D] -> [3, B, Lp, hg, D]: rank j's tokens are positions j*l .. j*l + l - 1
            qkv = recv[c].permute(1, 2, 0, 3, 4, 5).reshape(3, b, n * ln, hg, d)
            # k, v cut to L: the padded keys removed (see ``attend``)
            out = inner(qkv[0], qkv[1, :, : self.seq_len], qkv[2, :, : self.seq_len])  # [B, Lp, hg, Dv]
            # [B, Lp, hg, Dv] -> [N, B, l, hg, Dv]: token block j goes back to rank j
            part = out.unflatten(1, (n, ln)).movedim(1, 0).contiguous()
            if back is None:
                back = part.new_empty(g, *part.shape)
            outputs.append(dist.all_to_all_single(back[c], part, group=self.group, async_op=True))
        for work in outputs:
            work.wait()
        # [G, N, B, l, hg, Dv] -> [B, l, N, G, hg, Dv] -> [B, l, H, Dv]: head j*(H/N) + c*hg + i
        return back.permute(2, 3, 1, 0, 4, 5).reshape(b, ln, h, back.shape[-1])


def _install_backend(device: torch.device) -> None:
    """Put the Ulysses op in the self-attention slot, around the kernel that slot would use (once per
    process; again if something chose another backend since, e.g. another pipeline's ``choose_attention``)."""
    if attention.active_backend() is None:
        attention.set_backend("auto", device)
    name = attention.active_self_attention_backend()
    if name.startswith(_PREFIX):
        return
    own = attention._self_active  # the slot's kernel, else the default backend's
    _INNER["fn"] = (own or attention._active)[1]
    attention.register_backend(_PREFIX + name, lambda: _ulysses_self_attention, lambda: True)
    attention.set_self_attention_backend(_PREFIX + name)


def apply_ulysses(dit: nn.Module, group: dist.ProcessGroup, chunks: int = 1) -> UlyssesPlan:
    """Install the plan onto a built (optionally ``wanfast.accel``-optimised, also regionally compiled:
    the blocks are traced at their first call, after this) WanDiT. ``chunks``: head groups per rank whose
    all-to-alls overlap the attention (1: off, the blocking path)."""
    plan = UlyssesPlan(group, dit.cfg.num_heads, chunks)
    dit.patch_embedding.register_forward_hook(plan.split_tokens)
    dit.rope = plan.split_rope(dit.rope)  # wraps the RoPE cache when there is one
    dit.time_embed = plan.split_time(dit.time_embed)  # wraps the time-embedding cache when there is one
    _install_backend(next(dit.parameters()).device)
    dit.head.register_forward_hook(plan.gather_tokens)
    return plan
