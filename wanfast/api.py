"""Public entry points: ``load_pipeline`` and the tiny random-weight pipeline."""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace

import torch

from wanfast.accel import optimize_pipeline
from wanfast.config import PRESETS, EngineSettings, parse_dtype
from wanfast.loading.layout import detect_layout, load_text_encoder, load_transformer, load_vae
from wanfast.pipeline import WanPipeline


def _settings(device: str | torch.device, dtype, vae_dtype, text_encoder_device) -> EngineSettings:
    return EngineSettings(
        device=str(device),
        dtype=parse_dtype(dtype),
        vae_dtype=parse_dtype(vae_dtype) if vae_dtype is not None else None,
        text_encoder_device=str(text_encoder_device) if text_encoder_device is not None else None,
    )


def load_pipeline(
    ckpt_dir: str | os.PathLike,
    device: str | torch.device = "cuda",
    dtype: torch.dtype | str = torch.bfloat16,
    vae_dtype: torch.dtype | str | None = torch.float32,
    text_encoder_device: str | torch.device | None = None,
    settings: EngineSettings | None = None,
) -> WanPipeline:
    """Load a Wan2.2 T2V-A14B checkpoint folder (official or Diffusers layout, detected).

    ``dtype`` is the DiT and text-encoder weight dtype; the VAE runs in ``vae_dtype`` (float32 by
    default, as the official pipeline); ``text_encoder_device`` defaults to ``device``. ``settings``,
    when given, holds all of these (and the ``wanfast.accel`` switches) and replaces those four arguments.
    The experts are optimised by ``wanfast.accel.optimize_pipeline`` per the settings, then split over the
    ranks by ``wanfast.parallel.parallelize`` when ``settings.cfg_parallel`` or ``settings.ulysses > 1``.
    """
    settings = settings or _settings(device, dtype, vae_dtype, text_encoder_device)
    split = settings.cfg_parallel or settings.ulysses > 1  # multi-process: wanfast.parallel applies it
    if split:
        from wanfast.parallel import parallel_settings

        settings = parallel_settings(settings)
    layout = detect_layout(ckpt_dir)  # checks that every component is present before reading weights
    te_device = settings.text_encoder_device or settings.device
    # With an offload mode the experts load into CPU memory; apply_offload then puts on the device only
    # what that mode keeps there, so loading never needs both experts on the GPU at once.
    expert_device = "cpu" if settings.offload else settings.device
    high = load_transformer(layout.high_noise, expert_device, settings.dtype)
    low = load_transformer(layout.low_noise, expert_device, settings.dtype)
    if settings.lora_high_noise or settings.lora_low_noise:  # on the plain experts, before accel fuses q/k/v
        from wanfast.loading.lora import apply_lora, check_lora_settings

        check_lora_settings(settings)
        for dit, path in ((high, settings.lora_high_noise), (low, settings.lora_low_noise)):
            if path:
                apply_lora(dit, path, settings.lora_strength, settings.lora_merge)
    text_len = high.cfg.text_len
    text_encoder = load_text_encoder(
        layout.text_encoder, layout.tokenizer, te_device, settings.dtype, text_len
    )
    vae = load_vae(layout.vae, settings.device, settings.vae_dtype or settings.dtype)
    defaults = PRESETS["t2v-A14B"].defaults
    if layout.boundary is not None:
        defaults = replace(defaults, boundary=float(layout.boundary))
    pipe = optimize_pipeline(WanPipeline(text_encoder, high, low, vae, defaults, settings))
    if split:
        from wanfast.parallel import parallelize

        parallelize(pipe)
    if settings.offload:  # after accel: fusion / FP8 decide which weight tensors exist
        from wanfast.accel.offload import apply_offload

        apply_offload(pipe)
    return pipe


def tiny_pipeline(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
    settings: EngineSettings | None = None,
) -> WanPipeline:
    """A small random-weight pipeline (the ``tiny`` preset), built by writing a tiny official-layout
    checkpoint and loading it through the same code as a real one. ``settings`` as for ``load_pipeline``."""
    from wanfast.testing import write_official_checkpoint

    folder = workdir or tempfile.mkdtemp(prefix="wanfast-tiny-")
    write_official_checkpoint(folder, PRESETS["tiny"], seed=seed)
    pipe = load_pipeline(folder, device=device, dtype=dtype, vae_dtype=dtype, settings=settings)
    pipe.defaults = PRESETS["tiny"].defaults
    return pipe
