"""Token ids for training and generation, and padded batches.

Decoder-only models read ``source <sep> target <eos>`` (the paper's GPT-2 format with ``<sep>`` the
BOS token) and learn only the target; encoder-decoder models read the source in the encoder and the
target in the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Example
from .errors import PrefixTuneError


def context_length(config) -> int | None:
    """The model's maximum positions, or None where positions are relative (T5)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class Features:
    """One tokenized example: ids (T,), labels (T,) with -100 where no loss, and its origin."""

    input_ids: list[int]
    labels: list[int]
    origin: str = ""
    decoder: bool = False  # labels are decoder targets (encoder-decoder), not aligned with input_ids


class Formatter:
    """Tokenizes examples for one model and prefix length.

    Args:
        tokenizer: A Hugging Face tokenizer.
        is_encoder_decoder: The model family.
        context: Most positions the model accepts (None: no limit).
        prefix_len: P, which occupies positions 0..P-1 of a decoder-only model.
        truncate: Cut sources that do not fit instead of raising an error.
    """

    def __init__(
        self, tokenizer, is_encoder_decoder: bool, context: int | None, prefix_len: int, truncate: bool = False
    ):
        self.tokenizer = tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.context = context
        self.prefix_len = prefix_len
        self.truncate = truncate
        eos = tokenizer.eos_token_id
        bos = getattr(tokenizer, "bos_token_id", None)
        self.eos = eos
        self.sep = bos if bos is not None else eos

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _fit(self, source: list[int], rest: int, origin: str) -> list[int]:
        if self.context is None:
            return source
        room = self.context - rest
        if len(source) <= room:
            return source
        if not self.truncate or room <= 0:
            raise PrefixTuneError(
                f"{origin or 'input'}: {len(source) + rest} positions (with the prefix) exceed the model's context of "
                f"{self.context}; shorten it or pass --truncate"
            )
        return source[:room]

    def fit(self, prompt: list[int], origin: str = "") -> list[int]:
        """A prompt made elsewhere (a chat template), checked (or cut) to fit after the prefix."""
        return self._fit(prompt, 0 if self.is_encoder_decoder else self.prefix_len, origin)

    def source_ids(self, source: str, origin: str = "", target_room: int = 0) -> list[int]:
        """The prompt for generation: ``source <sep>`` (decoder-only) or ``source <eos>`` (encoder)."""
        if self.is_encoder_decoder:
            return self._fit(self._ids(source), 1, origin) + [self.eos]
        return self._fit(self._ids(source), self.prefix_len + 1 + target_room, origin) + [self.sep]

    def encode(self, example: Example) -> Features:
        """Input ids and labels of one example; only target tokens (and EOS) carry a label."""
        target = self._ids(example.target) + [self.eos]
        if self.is_encoder_decoder:
            if self.context is not None and len(target) > self.context:
                raise PrefixTuneError(
                    f"{example.origin}: target of {len(target)} tokens exceeds context {self.context}"
                )
            return Features(self.source_ids(example.source, example.origin), target, example.origin, decoder=True)
        prompt = self.source_ids(example.source, example.origin, target_room=len(target))
        return Features(prompt + target, [-100] * len(prompt) + target, example.origin)


def collate(features: list[Features], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of features into tensors: input_ids, attention_mask, labels."""
    width = max(len(f.input_ids) for f in features)
    label_width = max(len(f.labels) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    labels = torch.full((len(features), label_width), -100, dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f.input_ids)] = torch.tensor(f.input_ids)
        mask[i, : len(f.input_ids)] = 1
        labels[i, : len(f.labels)] = torch.tensor(f.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for batched generation; returns (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask
