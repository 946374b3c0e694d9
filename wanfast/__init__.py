"""wanfast: fast inference for the Wan2.2 text-to-video models."""

from wanfast.api import load_pipeline, tiny_pipeline
from wanfast.config import PRESETS, ConfigError, DiTConfig, EngineSettings, SamplingParams, VAEConfig
from wanfast.loading.checkpoint import CheckpointError
from wanfast.loading.layout import detect_layout, load_text_encoder, load_transformer, load_vae
from wanfast.pipeline import GenerationResult, WanPipeline

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DiTConfig",
    "EngineSettings",
    "GenerationResult",
    "SamplingParams",
    "VAEConfig",
    "WanPipeline",
    "detect_layout",
    "load_pipeline",
    "load_text_encoder",
    "load_transformer",
    "load_vae",
    "tiny_pipeline",
]
