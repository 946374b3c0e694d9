"""Diffusers' Wan models at a spec's real dimensions with random weights, as ``wanfast bench``'s peer:
``WanTransformer3DModel`` and ``AutoencoderKLWan`` (the Wan2.1 or Wan2.2 VAE) built on the meta device and
materialised on the target, in the per-parameter dtypes ``from_pretrained`` would leave, and the
``WanPipeline`` around them (official UniPC flow schedule; TI2V's per-token timesteps)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from wanfast.loading import dit_keys, vae_keys
from wanfast.specs import ModelSpec
from wanfast.tools.synthetic import randomize_


def version() -> str | None:
    """Diffusers' version, or None where it is not importable."""
    try:
        import diffusers
    except ImportError:
        return None
    return diffusers.__version__


def _init_kwargs(cls: type, config: dict) -> dict:
    """The keys of a config.json dict that ``cls.__init__`` takes (drops _class_name, text_len, ...)."""
    names = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in config.items() if k in names}


def _cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Per-parameter dtype as Diffusers' ``from_pretrained(torch_dtype=dtype)`` leaves it: parameters under a
    module named in ``_keep_in_fp32_modules`` stay float32, the rest take ``dtype``; buffers keep the dtype
    they were built in. Timing the peer in any other precision would not be timing what users run."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in model.named_parameters():
        target = torch.float32 if any(m in name.split(".") for m in keep) else dtype
        p.data = p.data.to(target)
    return model.eval().requires_grad_(False)


def random_transformer(preset: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """``WanTransformer3DModel`` at ``preset``'s dimensions, built on meta and materialised on ``device``."""
    from diffusers import WanTransformer3DModel

    config = _init_kwargs(WanTransformer3DModel, dit_keys.diffusers_config_json(preset.dit))
    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    # Dtypes are set on meta, so a 14B expert is materialised once, in them (never as a 57 GB fp32 copy).
    model = _cast_like_from_pretrained(model, dtype).to_empty(device=device)
    # to_empty leaves buffers uninitialised, and the RoPE tables are buffers computed at construction.
    # They do not depend on the depth, so a 0-layer twin built on the device supplies them cheaply.
    with torch.device(device):
        twin = WanTransformer3DModel.from_config({**config, "num_layers": 0})
    buffers = dict(twin.named_buffers())
    if set(buffers) != {n for n, _ in model.named_buffers()}:
        raise RuntimeError(
            "WanTransformer3DModel has buffers outside its 0-layer twin; cannot materialise it"
        )
    for name, buf in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, buf, persistent=False)
    return randomize_(model, seed)


def random_vae(preset: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """``AutoencoderKLWan`` (~127M parameters: small enough to build on the device directly)."""
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        vae = AutoencoderKLWan.from_config(
            _init_kwargs(AutoencoderKLWan, _vae_keys(preset).diffusers_config_json(preset.vae))
        )
    randomize_(vae, seed)
    return _cast_like_from_pretrained(vae, dtype)


def _vae_keys(spec: ModelSpec):
    if getattr(spec.vae, "kind", "wan2.1") == "wan2.2":
        from wanfast.loading import vae22_keys

        return vae22_keys
    return vae_keys


def make_pipeline(preset: ModelSpec, text_encoder=None, transformer=None, transformer_2=None, vae=None):
    """``diffusers.WanPipeline`` with the official UniPC flow schedule (shift from the preset)."""
    import diffusers

    scheduler = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=preset.defaults.shift,
        num_train_timesteps=1000,
    )  # fmt: skip
    pipe = diffusers.WanPipeline(
        tokenizer=None if text_encoder is None else text_encoder.tokenizer,
        text_encoder=None if text_encoder is None else text_encoder.model,
        vae=vae, scheduler=scheduler, transformer=transformer, transformer_2=transformer_2,
        boundary_ratio=preset.defaults.boundary if transformer_2 is not None else None,
        expand_timesteps=preset.conditioning == "first_frame",  # Wan2.2 TI2V: per-token timesteps
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pad_text(ctx: torch.Tensor, text_len: int) -> torch.Tensor:
    """[L, D] -> [1, text_len, D] zero-padded, as Diffusers' pipeline hands prompt embeddings over."""
    return torch.cat([ctx, ctx.new_zeros(text_len - ctx.shape[0], ctx.shape[1])])[None]
