"""Regional torch.compile: each DiT block's ``forward``, ``fullgraph=True``, ``dynamic=False``.

Compiling the block (not the whole DiT) keeps compile time to one block: every block runs the same code
with its parameters as graph inputs, so Dynamo traces once and the 40 blocks (and both experts) share the
graph. Inductor fuses the elementwise work around the GEMMs and attention: modulation, LayerNorm/RMSNorm
in float32, RoPE, gates and residual adds, GELU.

Graphs per latent shape: two (block 0 takes the patch embedding's weight-dtype x, later blocks the
float32 residual stream). Between denoising steps nothing changes but tensor values: the timestep and the
text K/V arrive as tensors, so no step recompiles (tests/test_accel.py fails if one does).

Only ``forward`` is compiled, not ``block.__call__``: forward pre-hooks (the cross-K/V cache lookup) run
eagerly around the compiled graph and hand it plain tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from wanfast.config import COMPILE_MODES, ConfigError
from wanfast.models.dit import WanDiT

# Each new latent size adds two graphs per block code object; the default limit (8) would make a server
# that sees more than four sizes stop compiling new ones.
RECOMPILE_LIMIT = 64

# EngineSettings.compile_mode -> torch.compile keywords (inductor only). CUDA graphs stay with their own
# switch (accel/graphs.py), hence the no-cudagraphs autotune mode.
COMPILE_KWARGS: dict[str | None, dict] = {
    None: {},
    "coordinate-descent": {"options": {"coordinate_descent_tuning": True}},
    "max-autotune": {"mode": "max-autotune-no-cudagraphs"},
}
assert set(COMPILE_KWARGS) == {None, *COMPILE_MODES}


def compile_blocks(dit: WanDiT, backend: str = "inductor", mode: str | None = None) -> int:
    """Compile every block's forward in place (``mode``: None or one of ``COMPILE_MODES``); returns the
    number of blocks compiled."""
    if mode not in COMPILE_KWARGS:
        raise ConfigError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if mode is not None and backend != "inductor":
        raise ConfigError(f"compile mode {mode!r} tunes inductor's kernels; backend {backend!r} has none")
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
    options = COMPILE_KWARGS[mode]
    n = 0
    for block in dit.blocks:
        if not is_compiled(block):
            block.forward = torch.compile(
                block.forward, fullgraph=True, dynamic=False, backend=backend, **options
            )
            n += 1
    return n


def is_compiled(block: nn.Module) -> bool:
    return "forward" in block.__dict__  # the compiled forward is an instance attribute over the method
