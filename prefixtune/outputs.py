"""What a forward pass returns, and the losses it takes (fp32 cross-entropy over target tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class PrefixLMOutput:
    """Output of :meth:`PrefixTunedModel.forward`.

    Attributes:
        loss: Mean cross-entropy over target tokens (labels ≠ -100), or None without labels.
        logits: (B, T, V) next-token logits for the (decoder) input positions.
        num_target_tokens: Tokens the loss averages over.
        cache: The cache after the pass (prefix + input), when ``use_cache``.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    num_target_tokens: int = 0
    cache: Any = None


def causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy in fp32 over labels ≠ -100; logits (B, T, V), labels (B, T)."""
    shifted = logits[:, :-1].float()  # (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    count = int((target != -100).sum())
    loss = nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), ignore_index=-100)
    return loss, count


def seq2seq_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy in fp32 where decoder position t predicts labels[t]."""
    count = int((labels != -100).sum())
    loss = nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )
    return loss, count
