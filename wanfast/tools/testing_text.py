"""Offline stand-ins for the text encoder's files: a tiny tokenizer and random-weight UMT5 checkpoints
in the official and the Diffusers layouts. Nothing here downloads anything."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from wanfast.config import TextEncoderConfig
from wanfast.loading.t5_keys import HF_EMBED_TIED, hf_config, official_to_hf

# Same special ids as the umt5-xxl tokenizer: <pad> 0, </s> 1, <unk> 2.
_SPECIALS = ("<pad>", "</s>", "<unk>")
_WORDS = (
    "a the of and in on with at to is are cat dog bird car city street river forest sky sun night "
    "light red blue green white black slow motion camera video shot close up wide scene people walks "
    "runs flies over under through beautiful small large young old man woman child"
).split()


def write_tiny_tokenizer(path: str | os.PathLike, vocab_size: int = 512) -> Path:
    """A SentencePiece-like Unigram tokenizer of exactly ``vocab_size`` pieces, saved so that
    ``AutoTokenizer.from_pretrained(path)`` loads it. Any text tokenizes: single characters are pieces,
    anything else is ``<unk>``; whole words and letter pairs make token counts vary with the prompt."""
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [*_SPECIALS, "▁", *chars, *("▁" + w for w in _WORDS)]
    # Fill up to vocab_size with word-initial and inner letter pairs, in a fixed order.
    pairs = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    for p in (*("▁" + p for p in pairs), *pairs):
        if len(pieces) >= vocab_size:
            break
        if p not in pieces:
            pieces.append(p)
    if len(pieces) < vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is larger than the tiny vocabulary ({len(pieces)})")
    if len(pieces) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for the base pieces ({len(pieces)})")
    # Equal log-probabilities: Viterbi then picks the segmentation with the fewest pieces.
    tok = Tokenizer(models.Unigram([(p, 0.0 if p in _SPECIALS else -1.0) for p in pieces], unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(path))
    return path


def random_official_t5_state_dict(
    cfg: TextEncoderConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights in the official key naming. Scales keep activations O(1) through a few layers
    (the official init would make the attention nearly uniform, which tests could not tell apart)."""
    g = torch.Generator().manual_seed(seed)
    d, f, a = cfg.dim, cfg.ffn_dim, cfg.num_heads * cfg.head_dim

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm_weight() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(d, generator=g)).to(dtype)

    sd = {"token_embedding.weight": normal(cfg.vocab_size, d, std=1.0)}
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"] = norm_weight()
        for name in "qkv":
            sd[b + f"attn.{name}.weight"] = normal(a, d, std=d**-0.5)
        sd[b + "attn.o.weight"] = normal(d, a, std=a**-0.5)
        sd[b + "norm2.weight"] = norm_weight()
        sd[b + "ffn.gate.0.weight"] = normal(f, d, std=d**-0.5)
        sd[b + "ffn.fc1.weight"] = normal(f, d, std=d**-0.5)
        sd[b + "ffn.fc2.weight"] = normal(d, f, std=f**-0.5)
        sd[b + "pos_embedding.embedding.weight"] = normal(cfg.num_buckets, cfg.num_heads, std=1.0)
    sd["norm.weight"] = norm_weight()
    return sd


def write_official_t5(
    path: str | os.PathLike, cfg: TextEncoderConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """A ``models_t5_umt5-xxl-enc-bf16.pth``-style file: a plain torch state dict, official keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(random_official_t5_state_dict(cfg, seed, dtype), path)
    return path


def write_diffusers_t5(
    text_encoder_dir: str | os.PathLike,
    cfg: TextEncoderConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
) -> Path:
    """A Diffusers ``text_encoder/`` folder (config.json + model.safetensors, or ``shards`` files with
    model.safetensors.index.json) with the same weights ``write_official_t5`` writes for ``seed``.

    Like ``save_pretrained``, only ``shared.weight`` of the tied embedding pair is stored."""
    folder = Path(text_encoder_dir)
    folder.mkdir(parents=True, exist_ok=True)
    hf_config(cfg).save_pretrained(str(folder))
    sd = official_to_hf(random_official_t5_state_dict(cfg, seed, dtype))
    del sd[HF_EMBED_TIED]
    if shards <= 1:
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    keys = list(sd)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: sd[k] for k in keys[s::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder
