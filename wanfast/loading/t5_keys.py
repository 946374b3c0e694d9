"""UMT5-XXL encoder: key names and configs of the two checkpoint layouts.

Official Wan (``models_t5_umt5-xxl-enc-bf16.pth``, ``wan/modules/t5.py`` ``T5Encoder`` with
``shared_pos=False``)::

    token_embedding.weight
    blocks.{i}.norm1.weight                       blocks.{i}.attn.{q,k,v,o}.weight
    blocks.{i}.pos_embedding.embedding.weight     [num_buckets, num_heads], one table per block
    blocks.{i}.norm2.weight
    blocks.{i}.ffn.gate.0.weight                  GELU(tanh) branch
    blocks.{i}.ffn.fc1.weight                     linear branch
    blocks.{i}.ffn.fc2.weight
    norm.weight

transformers ``UMT5EncoderModel`` (Diffusers ``text_encoder/``)::

    shared.weight  (tied with encoder.embed_tokens.weight)
    encoder.block.{i}.layer.0.{layer_norm, SelfAttention.{q,k,v,o,relative_attention_bias}}.weight
    encoder.block.{i}.layer.1.{layer_norm, DenseReluDense.{wi_0,wi_1,wo}}.weight
    encoder.final_layer_norm.weight

The FFN is ``fc2(fc1(x) * gelu(gate(x)))`` officially and ``wo(gelu(wi_0(x)) * wi_1(x))`` in
transformers, so ``gate.0`` is ``wi_0`` and ``fc1`` is ``wi_1``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from wanfast.config import TextEncoderConfig

if TYPE_CHECKING:
    from transformers import UMT5Config

# (official, HF) for the keys outside the blocks. The HF embedding is stored twice (tied), see below.
_TOP = (
    ("token_embedding.weight", "shared.weight"),
    ("norm.weight", "encoder.final_layer_norm.weight"),
)
# (official, HF) suffixes inside block i; prefixes are "blocks.{i}." and "encoder.block.{i}.".
_BLOCK = (
    ("norm1.weight", "layer.0.layer_norm.weight"),
    ("attn.q.weight", "layer.0.SelfAttention.q.weight"),
    ("attn.k.weight", "layer.0.SelfAttention.k.weight"),
    ("attn.v.weight", "layer.0.SelfAttention.v.weight"),
    ("attn.o.weight", "layer.0.SelfAttention.o.weight"),
    ("pos_embedding.embedding.weight", "layer.0.SelfAttention.relative_attention_bias.weight"),
    ("norm2.weight", "layer.1.layer_norm.weight"),
    ("ffn.gate.0.weight", "layer.1.DenseReluDense.wi_0.weight"),
    ("ffn.fc1.weight", "layer.1.DenseReluDense.wi_1.weight"),
    ("ffn.fc2.weight", "layer.1.DenseReluDense.wo.weight"),
)
HF_EMBED = "shared.weight"
HF_EMBED_TIED = "encoder.embed_tokens.weight"

_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")


def _rename(
    sd: Mapping[str, torch.Tensor], block_re: re.Pattern, dst_prefix: str, top: dict, block: dict
) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, t in sd.items():
        m = block_re.fullmatch(key)
        if key in top:
            out[top[key]] = t
        elif m and m.group(2) in block:
            out[f"{dst_prefix}{m.group(1)}.{block[m.group(2)]}"] = t
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" ... (+{len(unknown) - 8} more)" if len(unknown) > 8 else "")
        raise ValueError(f"{len(unknown)} keys are not UMT5 encoder weights: {shown}")
    return out


def official_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Wan T5Encoder keys -> transformers UMT5EncoderModel keys.

    Both tied embedding keys are produced, holding the same tensor object, so a strict load into
    ``UMT5EncoderModel`` works and the loader can keep one copy of the 1 GB-class table."""
    out = _rename(sd, _OFFICIAL_BLOCK, "encoder.block.", dict(_TOP), dict(_BLOCK))
    if HF_EMBED in out:
        out[HF_EMBED_TIED] = out[HF_EMBED]
    return out


def hf_to_official(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers UMT5EncoderModel keys -> official Wan T5Encoder keys.

    ``shared.weight`` and ``encoder.embed_tokens.weight`` are one tied table; either may be the one
    a file stores (``save_pretrained`` drops the tied duplicate), both map to ``token_embedding``."""
    sd = dict(sd)
    tied = sd.pop(HF_EMBED_TIED, None)
    if tied is not None:
        if HF_EMBED in sd and sd[HF_EMBED].shape != tied.shape:
            raise ValueError(f"{HF_EMBED} {tuple(sd[HF_EMBED].shape)} and {HF_EMBED_TIED} "
                             f"{tuple(tied.shape)} should be one tied table")  # fmt: skip
        sd.setdefault(HF_EMBED, tied)
    inv_top = {hf: off for off, hf in _TOP}
    inv_block = {hf: off for off, hf in _BLOCK}
    return _rename(sd, _HF_BLOCK, "blocks.", inv_top, inv_block)


def tie_hf_embeddings(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give an HF state dict both tied embedding keys, one tensor object (files often store one)."""
    sd = dict(sd)
    emb = sd.get(HF_EMBED, sd.get(HF_EMBED_TIED))
    if emb is not None:
        sd[HF_EMBED] = emb
        sd[HF_EMBED_TIED] = emb
    return sd


def config_from_official_state_dict(sd: Mapping[str, torch.Tensor], text_len: int = 512) -> TextEncoderConfig:
    """Architecture from tensor shapes. The bucket count and head count come from the per-block
    relative-position table ([num_buckets, num_heads]); ``eps``/``max_distance`` are not stored in the
    file and keep the UMT5 values (1e-6, 128), as the official code hard-codes them."""
    needed = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
              "blocks.0.pos_embedding.embedding.weight")  # fmt: skip
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"not an official Wan UMT5 encoder state dict: missing {', '.join(missing)}")
    vocab_size, dim = sd["token_embedding.weight"].shape
    ffn_dim = sd["blocks.0.ffn.fc1.weight"].shape[0]
    num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
    if dim_attn % num_heads:
        raise ValueError(f"attention width {dim_attn} is not divisible by {num_heads} heads")
    layers = {int(m.group(1)) for k in sd if (m := _OFFICIAL_BLOCK.fullmatch(k))}
    if layers != set(range(len(layers))):
        raise ValueError(f"block indices are not contiguous from 0: {sorted(layers)}")
    return TextEncoderConfig(
        vocab_size=int(vocab_size), dim=int(dim), ffn_dim=int(ffn_dim), num_heads=int(num_heads),
        num_layers=len(layers), head_dim=int(dim_attn // num_heads), num_buckets=int(num_buckets),
        text_len=text_len,
    )  # fmt: skip


def config_from_hf(d: Mapping, text_len: int = 512) -> TextEncoderConfig:
    """TextEncoderConfig from a transformers ``config.json`` dict of a UMT5 encoder."""
    if d.get("model_type", "umt5") != "umt5":
        raise ValueError(f"text encoder config has model_type {d['model_type']!r}, expected 'umt5'")
    if d.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise ValueError(f"unsupported feed_forward_proj {d['feed_forward_proj']!r}; UMT5 uses 'gated-gelu'")
    try:
        return TextEncoderConfig(
            vocab_size=d["vocab_size"], dim=d["d_model"], ffn_dim=d["d_ff"], num_heads=d["num_heads"],
            num_layers=d["num_layers"], head_dim=d["d_kv"],
            num_buckets=d.get("relative_attention_num_buckets", 32),
            max_distance=d.get("relative_attention_max_distance", 128),
            eps=d.get("layer_norm_epsilon", 1e-6), text_len=text_len,
        )  # fmt: skip
    except KeyError as e:
        raise ValueError(f"text encoder config lacks {e.args[0]!r}") from e


def hf_config(cfg: TextEncoderConfig, attn_implementation: str = "sdpa") -> UMT5Config:
    """The ``UMT5Config`` of ``cfg``, with the google/umt5-xxl conventions: gated GELU-tanh FFN
    ("gated-gelu" -> dense_act_fn "gelu_new"), pad 0, EOS 1, no lm-head tying. ``is_encoder_decoder``
    stays True as in the released config; ``UMT5EncoderModel`` switches it off for its stack."""
    from transformers import UMT5Config  # seconds of imports: only where a model is built

    return UMT5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.dim,
        d_kv=cfg.head_dim,
        d_ff=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance,
        layer_norm_epsilon=cfg.eps,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.1,  # inert: the encoder only ever runs in eval mode
        is_encoder_decoder=True,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
        architectures=["UMT5EncoderModel"],
        attn_implementation=attn_implementation,
    )
