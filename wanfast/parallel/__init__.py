"""Multi-GPU inference: CFG-parallel x Ulysses sequence parallel, shared text encoding, tiled VAE decode.

``parallelize(pipe)`` applies the plan of ``pipe.settings`` (``cfg_parallel``, ``ulysses``) to a built
pipeline: ``apply_ulysses`` hooks each expert (``ulysses.py``), and ``pipe.parallel`` becomes a
``ParallelRuntime`` (``cfg.py``) through which ``WanPipeline.run`` encodes the text once (rank 0, then
broadcast), splits the cond/uncond passes over the CFG groups and decodes the VAE in tiles across all
ranks (``vae.py``). Launch with ``torchrun --nproc-per-node N -m wanfast generate --cfg-parallel
--ulysses K``, N = (2 if cfg-parallel else 1) x K; ``init_distributed`` joins the group (NCCL on GPUs,
gloo on CPU).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from wanfast.config import EngineSettings
from wanfast.parallel.dist import Mesh, init_distributed, make_mesh, rank
from wanfast.parallel.ulysses import apply_ulysses
from wanfast.parallel.vae import parallel_decode

log = logging.getLogger("wanfast.parallel")

__all__ = ["Mesh", "init_distributed", "make_mesh", "parallelize", "parallel_settings", "rank"]
__all__ += ["apply_ulysses", "parallel_decode"]


def parallel_settings(settings: EngineSettings) -> EngineSettings:
    """Settings to optimise with before ``parallelize``. Regional compile stays on: the Ulysses
    collectives run inside one opaque custom op (``ulysses.py``), so the blocks still trace as one graph.
    CUDA graphs are turned off under Ulysses (they would capture the all-to-alls; not measured)."""
    if settings.ulysses > 1 and settings.cuda_graphs:
        log.warning("parallel: cuda_graphs are off under Ulysses (collectives inside the captured step)")
    return replace(settings, cuda_graphs=False) if settings.ulysses > 1 else settings


def parallelize(pipe):
    """Apply ``pipe.settings``' split to a built ``WanPipeline`` in place (collective: all ranks call it).
    Returns ``pipe``."""
    from wanfast.parallel.cfg import ParallelRuntime

    s = pipe.settings
    mesh = make_mesh(s.cfg_parallel, s.ulysses)
    if mesh.sp_group is not None:
        for dit in pipe.experts.values():
            apply_ulysses(dit, mesh.sp_group, chunks=s.ulysses_chunks)
    pipe.parallel = ParallelRuntime(mesh, s.dtype)
    chunks = (
        f" ({s.ulysses_chunks} overlapped head groups)" if mesh.ulysses > 1 and s.ulysses_chunks > 1 else ""
    )
    log.info("parallel: rank %d of cfg %d x ulysses %d%s", mesh.rank, mesh.cfg, mesh.ulysses, chunks)
    return pipe
