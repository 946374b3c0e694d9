"""UMT5-XXL text encoder: prompt cleaning, tokenization, transformers ``UMT5EncoderModel``.

Matches the official ``T5EncoderModel.__call__`` (wan/modules/t5.py): prompts are cleaned as its
``HuggingfaceTokenizer(clean='whitespace')``, tokenized with EOS, padded to ``text_len`` (512) and
truncated, encoded with the attention mask, and each output is trimmed to its prompt's real token count.
"""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING

import ftfy
import torch

from wanfast.config import TextEncoderConfig

if TYPE_CHECKING:  # annotations only: transformers is imported by whoever builds the model
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """The official 'whitespace' cleaning: ftfy, HTML-unescape twice, strip, then collapse whitespace.

    The official code uses the ``regex`` module; its ``\\s`` differs from ``re``'s only on U+001C..U+001F,
    which ftfy strips as control characters and ``html.unescape`` never produces."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


class TextEncoder:
    """A loaded UMT5 encoder and its tokenizer. ``encode`` is the only entry point the pipeline needs.

    ``pad_to_text_len=False`` pads a batch only to its longest prompt instead of ``text_len``: the
    kept rows are the same up to float rounding (padding is masked out and the relative position bias
    depends only on offsets), and far fewer tokens are computed."""

    def __init__(
        self,
        model: UMT5EncoderModel,
        tokenizer: PreTrainedTokenizerBase,
        cfg: TextEncoderConfig,
        device: str | torch.device,
        pad_to_text_len: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = torch.device(device)
        self.pad_to_text_len = pad_to_text_len

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids, attention mask), both [B, L] on ``self.device``; prompts are cleaned first."""
        out = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length" if self.pad_to_text_len else "longest",
            truncation=True,
            max_length=self.cfg.text_len,
            add_special_tokens=True,  # appends EOS, which is part of the kept sequence
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_ids"].to(self.device), out["attention_mask"].to(self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> list[torch.Tensor]:
        """One [L_i, dim] tensor per prompt, L_i = its token count including EOS (<= text_len)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        ids, mask = self.tokenize(prompts)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return [h[:n] for h, n in zip(hidden, mask.sum(dim=1).tolist(), strict=True)]
