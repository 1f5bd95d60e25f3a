"""How a decoder's layers attend, read once from its config, and the masks that follow from it.

Each key slot carries its row's own position id, so attention that depends on distance — sliding
windows (Gemma 2/3, Mistral, gpt-oss), chunked attention (Llama 4) — is masked by positions, not slots
(see :mod:`prefixtune.state`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask

from .errors import PrefixTuneError

_KINDS = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "chunked"}
_RECURRENT = ("linear_attention", "conv")  # layers with a recurrent state and no keys or values
_NO_CACHE = "dummy"  # layers that read another layer's keys and values (KV sharing, Gemma 3n/4) or do not attend


@dataclass(frozen=True)
class AttentionLayout:
    """How the decoder's layers attend, read once from the config.

    Attributes:
        kinds: Per transformers attention layer type used (``"full_attention"``, ...): (kind, window or chunk).
        attention_indices: The layers that attend (and so take the prefix), in order.
        recurrent_types: Layer types with a recurrent state instead of keys and values (hybrid models):
            the prefix does not enter them; they start from their usual empty state.
        num_layers: All decoder layers. Layers with neither (KV-sharing layers that attend to an earlier
            layer's keys and values, prefix included; layers that do not attend) hold no cache.
        num_recurrent: How many layers are recurrent.
    """

    kinds: dict[str, tuple[str, int | None]]
    attention_indices: tuple[int, ...]
    recurrent_types: tuple[str, ...]
    num_layers: int
    num_recurrent: int = 0

    @classmethod
    def read(cls, config) -> AttentionLayout:
        types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        unsupported = sorted(set(types) - set(_KINDS) - set(_RECURRENT) - {_NO_CACHE})
        if unsupported:
            raise PrefixTuneError(
                f"unsupported model: its layers include {', '.join(unsupported)}; a prefix is keys and values, "
                "so every layer must be attention (full, sliding-window or chunked) with its own cache, or "
                "recurrent (linear attention, convolution), or share an earlier layer's cache"
            )
        kinds = {}
        for name, extra in zip(types, kwargs):
            if name in _KINDS:
                kinds.setdefault(name, (_KINDS[name], extra.get("sliding_window")))
        indices = tuple(i for i, t in enumerate(types) if t in _KINDS)
        if not indices:
            raise PrefixTuneError("unsupported model: it has no attention layer for a prefix to enter")
        recurrent = tuple(sorted({t for t in types if t in _RECURRENT}))
        return cls(kinds, indices, recurrent, len(types), sum(t in _RECURRENT for t in types))

    @property
    def plain(self) -> bool:
        """Every attention layer is full causal attention: transformers' own masks are already exact."""
        return set(self.kinds) == {"full_attention"}

    @property
    def recurrent(self) -> bool:
        return bool(self.recurrent_types)

    @property
    def sparse(self) -> bool:
        """Some layers have no keys and values of their own: the cache places the attention layers by index."""
        return len(self.attention_indices) != self.num_layers

    def check_implementation(self, config) -> None:
        if not self.plain and config._attn_implementation not in ("sdpa", "eager", "flex_attention"):
            raise PrefixTuneError(
                f"attention implementation {config._attn_implementation!r} masks sliding windows by slot, not "
                "position; load the model with attn_implementation='sdpa' or 'eager'"
            )


def _distance_rule(kind: str, size: int | None, key_pos: torch.Tensor):
    """A transformers mask function keeping keys within the window (or chunk) by position."""
    if kind == "sliding":
        return lambda b, h, q, kv: key_pos[b, kv] > key_pos[b, q] - size
    return lambda b, h, q, kv: (
        torch.div(key_pos[b, kv], size, rounding_mode="floor") == torch.div(key_pos[b, q], size, rounding_mode="floor")
    )


def self_attention_mask(config, layout: AttentionLayout, queries, key_mask, key_pos, cache):
    """The mask argument for a decoder pass: the 2D key mask, or per layer type a 4D mask by position.

    Args:
        queries: (B, T, ·) giving batch, query length, dtype and device.
        key_mask: (B, K + T) 1 for real keys (cached and new).
        key_pos: (B, K + T) position id of every key slot.
    """
    if layout.plain:
        return key_mask
    masks = {}
    for name, (kind, size) in layout.kinds.items():
        rule = None if kind == "full" else _distance_rule(kind, size, key_pos)
        masks[name] = create_causal_mask(
            config, queries, key_mask, cache, and_mask_function=rule, allow_is_causal_skip=False
        )
    for name in layout.recurrent_types:  # the padding of the new tokens, as transformers gives it
        masks[name] = create_recurrent_attention_mask(config, queries, key_mask, cache)
    return masks if len(masks) > 1 else next(iter(masks.values()))
