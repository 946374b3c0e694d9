"""Public entry points: ``load_pipeline`` (a checkpoint folder of any Wan2.2 model) and ``tiny_pipeline``
(a small random-weight model). Both go through ``wanfast.builder``."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from wanfast.builder import build_pipeline, settings_for
from wanfast.config import EngineSettings
from wanfast.pipeline import WanPipeline


def load_pipeline(
    ckpt_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    vae_dtype: torch.dtype | str | None = None,
    text_encoder_device: str | torch.device | None = None,
    settings: EngineSettings | None = None,
    plan_sizes: Sequence[tuple[int, int, int]] | None = None,
) -> WanPipeline:
    """Load a Wan2.2 checkpoint folder (T2V-A14B, TI2V-5B or I2V-A14B; official or Diffusers layout; the
    model and its architecture detected from what the folder holds).

    ``device`` defaults to CUDA when available, else the CPU; ``dtype`` (the DiT and text encoder) to bf16
    on CUDA and fp32 on the CPU; the VAE runs in ``vae_dtype`` (float32 by default, as the official
    pipeline); ``text_encoder_device`` defaults to ``device``. ``settings``, when given, holds all of these
    (and the ``wanfast.accel`` switches) and replaces those four arguments.

    With ``settings.memory_budget_gb`` the memory mode is picked before any weight is read, for the largest
    of ``plan_sizes`` ((width, height, frames) of the requests to come; default: the model's default size
    and frames), and on CUDA the process is capped at the budget; the picked mode is
    ``pipe.settings.offload``.
    """
    settings = settings or settings_for(device, dtype, vae_dtype, text_encoder_device)
    return build_pipeline(ckpt_dir, settings, plan_sizes)


def tiny_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    settings: EngineSettings | None = None,
    plan_sizes: Sequence[tuple[int, int, int]] | None = None,
    model: str = "tiny",
) -> WanPipeline:
    """A small random-weight pipeline (``model``: "tiny", "tiny-i2v", "tiny-ti2v"), built by writing a
    tiny official-layout checkpoint to a temporary folder, loading it through the same code as a real one,
    and removing the folder. ``settings`` and ``plan_sizes`` as for ``load_pipeline``."""
    settings = settings or settings_for(device, dtype, dtype)
    return build_pipeline(model, settings, plan_sizes, seed)
