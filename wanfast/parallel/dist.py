"""Process start-up and the rank layout: world = cfg (1 or 2) x ulysses, CFG groups outermost.

Rank r sits in CFG group ``r // ulysses`` (0: conditional pass, 1: unconditional) and at sequence position
``r % ulysses`` inside it. Ulysses groups are runs of consecutive ranks (on one host those share NVLink
anyway); a CFG pair is {s, s + ulysses}: the ranks holding the same token shard of the two passes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from wanfast.config import ConfigError


def init_distributed() -> tuple[int, int]:
    """Join the process group described by torchrun's environment; returns (rank, local_rank).

    A plain single-process run (no WORLD_SIZE, or 1) initialises nothing and returns (0, 0). NCCL when
    CUDA is present (the current device is then set to LOCAL_RANK), gloo otherwise."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not dist.is_initialized():
        return 0, local_rank
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), local_rank


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@dataclass
class Mesh:
    """This rank's place in the cfg x ulysses layout and the process groups it communicates in."""

    rank: int
    cfg: int  # 1 or 2
    ulysses: int
    sp_group: dist.ProcessGroup | None  # the ``ulysses`` ranks sharing one pass (None when ulysses == 1)
    cfg_group: dist.ProcessGroup | None  # this rank's CFG pair (None when cfg == 1)
    world_group: dist.ProcessGroup | None  # everybody (VAE tiles, text broadcast); None: the default group

    @property
    def cfg_index(self) -> int:
        return self.rank // self.ulysses

    @property
    def sp_rank(self) -> int:
        return self.rank % self.ulysses


def check_chunks(num_heads: int | None, ulysses: int, chunks: int) -> None:
    """``chunks`` head groups (``EngineSettings.ulysses_chunks``) are >= 1 and, with ``num_heads`` given,
    split each rank's num_heads / ulysses heads evenly; else ``ConfigError`` (a ValueError) naming the
    numbers."""
    if chunks < 1:
        raise ConfigError(f"ulysses chunks must be >= 1, got {chunks}")
    if num_heads is None:
        return
    per_rank = num_heads // ulysses
    if per_rank % chunks:
        raise ConfigError(
            f"ulysses chunks {chunks} must divide the {per_rank} heads per rank "
            f"({num_heads} attention heads over ulysses {ulysses})"
        )


def check_split(
    cfg_parallel: bool, ulysses: int, world: int, num_heads: int | None = None, chunks: int = 1
) -> None:
    """The split fits the launch: world = (2 if cfg_parallel else 1) x ulysses, heads divisible by
    ulysses, and under Ulysses the ``chunks`` head groups (``EngineSettings.ulysses_chunks``) dividing the
    heads per rank. Pure, so the CLI checks it before any weights load."""
    cfg = 2 if cfg_parallel else 1
    if ulysses < 1:
        raise ConfigError(f"ulysses must be >= 1, got {ulysses}")
    if cfg * ulysses != world:
        how = "launch with torchrun --nproc-per-node N" if world == 1 else f"{world} processes were launched"
        raise ConfigError(
            f"the split needs cfg ({cfg}) x ulysses ({ulysses}) = {cfg * ulysses} processes; {how}"
        )
    if num_heads is not None and num_heads % ulysses:
        raise ConfigError(f"ulysses {ulysses} must divide the DiT's {num_heads} attention heads")
    check_chunks(num_heads if ulysses > 1 else None, ulysses, chunks)  # without Ulysses: unused


def make_mesh(cfg_parallel: bool, ulysses: int) -> Mesh:
    """Create the groups (a collective call: every rank must call it, in the same order)."""
    if not dist.is_initialized():
        raise ConfigError(
            "cfg_parallel / ulysses need torch.distributed: launch with torchrun --nproc-per-node N"
        )
    world, r = dist.get_world_size(), dist.get_rank()
    cfg = 2 if cfg_parallel else 1
    check_split(cfg_parallel, ulysses, world)
    sp_group = cfg_group = None
    # new_group is collective over the whole world: every rank creates every group, keeps its own.
    for g in range(cfg):
        group = dist.new_group(list(range(g * ulysses, (g + 1) * ulysses))) if ulysses > 1 else None
        if g == r // ulysses:
            sp_group = group
    for s in range(ulysses):
        group = dist.new_group([s, s + ulysses]) if cfg == 2 else None
        if s == r % ulysses:
            cfg_group = group
    return Mesh(r, cfg, ulysses, sp_group, cfg_group, None)
