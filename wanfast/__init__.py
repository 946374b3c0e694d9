"""wanfast: fast inference for the Wan2.2 video models (T2V-A14B, TI2V-5B, I2V-A14B).

The public names load on first use (PEP 562), so ``import wanfast`` and the CLI's argument checks do not
pay for torch model code and transformers before they need them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_pipeline": "wanfast.api",
    "tiny_pipeline": "wanfast.api",
    "SPECS": "wanfast.specs",
    "ModelSpec": "wanfast.specs",
    "build_pipeline": "wanfast.builder",
    "load_image": "wanfast.image",
    "ConfigError": "wanfast.config",
    "DiTConfig": "wanfast.config",
    "EngineSettings": "wanfast.config",
    "LoraSpec": "wanfast.config",
    "SamplingParams": "wanfast.config",
    "VAEConfig": "wanfast.config",
    "CheckpointError": "wanfast.loading.checkpoint",
    "detect": "wanfast.loading.layout",
    "load_text_encoder": "wanfast.loading.layout",
    "load_transformer": "wanfast.loading.layout",
    "load_vae": "wanfast.loading.layout",
    "GenerationResult": "wanfast.pipeline",
    "WanPipeline": "wanfast.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'wanfast' has no attribute {name!r}")
