"""Lossless speed-ups, applied to a built plain ``WanDiT`` (``wanfast/models`` stays plain eager code).

``optimize_dit(dit, settings)`` applies, in this order, each behind its ``EngineSettings`` switch:

1. ``fuse_projections``: one QKV GEMM per self-attention, one KV GEMM per cross-attention (``fuse.py``);
2. ``quantize_dit_``: only when ``settings.quant == "fp8"`` (lossy, opt-in): the block Linears, fused ones
   included, become FP8 e4m3 per ``fp8.DEFAULT_POLICY`` (``fp8.py``); after fusion so the fused QKV / KV
   weights are what is quantised, before compile so the traced graphs hold the FP8 GEMMs;
   then, when the DiT has FP8 linears (from ``quant`` or an FP8 checkpoint) and ``fp8_row_kernels``,
   ``use_row_kernels``: the FFN's GELU + row quantisation and the attention output projections' row
   quantisation become one-pass Triton kernels (``kernels/rowquant.py``);
3. ``cache_rope``: RoPE tables once per (grid, device) (``caches.py``);
4. ``cache_cross_kv``: text embedding and per-block cross-attention K/V once per (expert, prompt), and the
   time embedding once per step (the CFG pair shares it) (``caches.py``);
5. ``compile``: regional torch.compile of every block, fullgraph, static shapes (``compile.py``);
   ``None`` means on for CUDA only;
6. ``cuda_graphs``: the whole forward captured per input signature (``graphs.py``); CUDA only. The
   caches of 3-4 cannot live inside a graph (a capture bakes in what a lookup returned), so the graph
   wrapper disables them and replays their work as kernels; this is logged.

Fusion must come before the caches (the cross-K/V pre-hook calls whichever ``cross_attn.kv`` the block
has) and compile before graphs (graphs capture the compiled kernels; warm-up compiles). Nothing here
moves weights: both experts stay resident, as built, unless a memory mode (``accel.offload``, applied
after all of this by ``load_pipeline``) streams them.

``optimize_pipeline(pipe)`` applies it to both experts with ``pipe.settings`` and chooses the attention
backend; ``reset_caches(pipe)`` (called by ``WanPipeline.run`` at the start of each request) clears the
per-request caches.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from wanfast import attention
from wanfast.accel.caches import cache_cross_kv, cache_rope, cache_time_embedding, caches_of
from wanfast.accel.compile import compile_blocks
from wanfast.accel.fp8 import apply_quant, fp8_modules, use_fp8_gemm, use_row_kernels
from wanfast.accel.fuse import fuse_projections
from wanfast.accel.graphs import CUDAGraphDiT
from wanfast.config import EngineSettings
from wanfast.models.dit import WanDiT

log = logging.getLogger("wanfast.accel")

__all__ = ["compiles", "optimize_dit", "optimize_pipeline", "reset_caches", "choose_attention"]


def choose_attention(settings: EngineSettings) -> str:
    """Resolve ``settings.attention_backend`` once: an explicit name always wins; "auto" keeps a backend
    already chosen (e.g. by the CLI's --attention) and otherwise picks the preferred available one."""
    if settings.attention_backend != "auto" or attention.active_backend() is None:
        name = attention.set_backend(settings.attention_backend, settings.device)
    else:
        name = attention.active_backend()
    # the DiT self-attention slot (None: follows the backend above); raises if the name is unavailable
    attention.set_self_attention_backend(settings.self_attention_backend, settings.device)
    return name


def compiles(settings: EngineSettings) -> bool:
    """Whether the DiT blocks are compiled: ``settings.compile``, by default on CUDA. Decided by where the
    DiT will run, not where its weights sit now: offload modes build experts on the CPU and stream them."""
    return settings.compile if settings.compile is not None else torch.device(settings.device).type == "cuda"


def optimize_dit(
    dit: WanDiT, settings: EngineSettings, *, compile_backend: str = "inductor", choose_backend: bool = True
) -> nn.Module:
    """Apply the enabled optimisations to ``dit`` in place, in the module docstring's order. Returns the
    module to call: ``dit`` itself, or a ``CUDAGraphDiT`` wrapping it when ``settings.cuda_graphs``.
    ``choose_backend=False``: the attention backend was chosen already (``optimize_pipeline``); an expert
    optimised in a loader thread while the steps run must not rebind the globals their traced graphs read."""
    if caches_of(dit) or isinstance(dit, CUDAGraphDiT):
        raise ValueError("this DiT is already optimised; optimize_dit applies to a plain one, once")
    device = next(dit.parameters()).device
    use_compile = compiles(settings)
    if settings.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs needs the DiT on a CUDA device, not {device}")
    applied = []
    if settings.fuse_projections:
        applied.append(f"fuse_projections ({fuse_projections(dit)} blocks)")
    if settings.quant is not None:
        applied.append(f"quant {settings.quant} ({apply_quant(dit, settings.quant)} linears)")
        use_fp8_gemm(dit, torch.device(settings.device))  # weights on the CPU until offload streams them
    if settings.fp8_row_kernels and fp8_modules(dit):
        applied.append(f"fp8_row_kernels ({use_row_kernels(dit)} linears)")
    if settings.cache_rope:
        cache_rope(dit)
        applied.append("cache_rope")
    if settings.cache_cross_kv:
        cache_cross_kv(dit)
        cache_time_embedding(dit)
        applied.append("cache_cross_kv (+ time embedding)")
    if use_compile:
        if choose_backend:
            choose_attention(settings)  # traced code bakes the backend in: choose it before the first trace
        n = compile_blocks(dit, compile_backend, settings.compile_mode)
        applied.append(f"compile ({n} blocks, {compile_backend}, mode {settings.compile_mode or 'default'})")
    if settings.cuda_graphs:
        dit = CUDAGraphDiT(dit)
        applied.append(
            "cuda_graphs" + (" (caches disabled: the graph replays their work)" if caches_of(dit) else "")
        )
    log.info("accel: %s", ", ".join(applied) or "nothing (plain eager)")
    return dit


# Each lossless switch by a short name: what equivalence tests and GPU checks turn on one at a time.
SWITCHES = {
    "fuse": "fuse_projections",
    "rope": "cache_rope",
    "cross_kv": "cache_cross_kv",
    "compile": "compile",
    "cuda_graphs": "cuda_graphs",
}


def each_alone(base: EngineSettings, names=tuple(SWITCHES)) -> dict[str, EngineSettings]:
    """``base.plain()`` with one switch on, for each name in ``names``."""
    return {n: replace(base.plain(), **{SWITCHES[n]: True}) for n in names}


def optimize_pipeline(pipe, *, compile_backend: str = "inductor"):
    """Choose the attention backend, optimise both experts and the VAE decode of a ``WanPipeline`` with
    ``pipe.settings``.
    Returns ``pipe`` (its ``experts`` entries replaced by the modules to call)."""
    backend = choose_attention(pipe.settings)
    log.info(
        "accel: attention backend %s, self-attention %s", backend, attention.active_self_attention_backend()
    )
    for name, dit in pipe.experts.ready().items():  # one still loading is optimised by its loader
        pipe.experts[name] = optimize_dit(dit, pipe.settings, compile_backend=compile_backend)
    from wanfast.accel.vae import optimize_vae

    pipe.vae = optimize_vae(pipe.vae, pipe.settings)
    return pipe


def reset_caches(obj) -> int:
    """Clear the per-request caches of a pipeline's experts or of one module; returns how many were
    cleared. RoPE tables depend on the shape alone and are kept."""
    # an expert still loading (wanfast.experts) has run no request: its caches are empty
    modules = list(obj.experts.ready().values()) if hasattr(obj, "experts") else [obj]
    cleared = 0
    for module in modules:
        if isinstance(module, nn.Module):
            for cache in caches_of(module):
                if cache.per_request:
                    cache.clear()
                    cleared += 1
    return cleared
