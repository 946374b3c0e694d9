"""Random-weight models at any preset's real dimensions, built directly on the target device.

Speed does not depend on weight values, so benchmarks time the real architecture without a download.
Modules are built on the meta device and materialised on the target with ``to_empty``: a 14B-parameter
expert never passes through CPU memory. Values are drawn on the device, scaled like a trained network
(fan-in scaled linears, norm scales near 1) so activations stay finite through 40 layers.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from wanfast.config import EngineSettings
from wanfast.loading.text_encoder import load_tokenizer
from wanfast.models.dit import WanDiT
from wanfast.models.text_encoder import TextEncoder
from wanfast.pipeline import WanPipeline
from wanfast.specs import ModelSpec


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter and persistent buffer on its own device, deterministically from ``seed``."""
    gen = None
    for i, (name, p) in enumerate(sorted(module.named_parameters())):
        if gen is None or gen.device != p.device:
            gen = torch.Generator(p.device).manual_seed(seed)
        gen.manual_seed(seed * 100003 + i)
        if name.endswith("gamma") or (p.dim() == 1 and name.endswith("weight")):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        elif p.dim() >= 2 and not name.endswith("modulation"):
            fan_in = math.prod(p.shape[1:])
            p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
        else:  # modulation tables [1, k, dim], embeddings
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=gen)
    return module


def materialize(build, device: torch.device | str, dtype: torch.dtype, seed: int) -> nn.Module:
    with torch.device("meta"):
        module = build()
    module = module.to_empty(device=device)
    randomize_(module, seed)
    module = module.to(dtype)
    if hasattr(module, "init_buffers"):
        module.init_buffers(torch.device(device))
    return module.eval().requires_grad_(False)


def random_dit(preset: ModelSpec, device, dtype: torch.dtype, seed: int = 0) -> WanDiT:
    dit = materialize(lambda: WanDiT(preset.dit), device, dtype, seed)
    for name, p in dit.named_parameters():
        if name.endswith("modulation"):  # consumed in fp32, as load_transformer keeps them
            p.data = p.data.float()
    return dit


def random_vae(spec: ModelSpec, device, dtype: torch.dtype, seed: int = 0):
    from wanfast.models import vae_class

    return materialize(lambda: vae_class(spec.vae)(spec.vae), device, dtype, seed)


def random_text_encoder(preset: ModelSpec, device, dtype: torch.dtype, seed: int = 0) -> TextEncoder:
    from transformers import UMT5EncoderModel

    from wanfast.loading.t5_keys import hf_config
    from wanfast.tools.testing_text import write_tiny_tokenizer

    cfg = preset.text_encoder
    model = materialize(lambda: UMT5EncoderModel(hf_config(cfg)), device, dtype, seed)
    tok_dir = Path(tempfile.mkdtemp(prefix="wanfast-tok-"))
    write_tiny_tokenizer(tok_dir, min(cfg.vocab_size, 512))  # ids only index the embedding
    return TextEncoder(model, load_tokenizer(tok_dir), cfg, device)


def random_pipeline(
    spec: ModelSpec,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    settings: EngineSettings | None = None,
) -> WanPipeline:
    """Every expert, the text encoder and the VAE at ``spec``'s dimensions, random weights, made ready by
    the builder (``builder.assemble``: accel, split, memory mode) with the switches of ``settings``
    (default ``EngineSettings()``); the device and dtypes are always the arguments'."""
    from wanfast.builder import assemble

    settings = replace(settings or EngineSettings(), device=device, dtype=dtype, vae_dtype=vae_dtype)
    # with a memory mode the experts start in CPU memory and apply_offload places them (as builder.build)
    expert_device = "cpu" if settings.offload else device
    experts = {
        name: random_dit(spec, expert_device, dtype, seed + i + 1) for i, name in enumerate(spec.experts)
    }
    return assemble(
        spec,
        random_text_encoder(spec, settings.text_encoder_device or device, dtype, seed + 3),  # --t5-cpu
        experts,
        random_vae(spec, device, vae_dtype, seed + 4),
        settings,
    )
