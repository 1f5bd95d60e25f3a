"""How a prefix enters a frozen Hugging Face model: per-row prefixes, positions, masks, encoder hooks.

Li & Liang 2021 (§4.2) feed the prefix as already-computed keys and values (``past_key_values``):
every layer attends to [K_P; K_x] and [V_P; V_x], the prefix occupies positions 0..P-1 and the
real tokens start at position P. We do the same with transformers' Cache classes:

* decoder-only models and decoder self-attention: a cache filled with the prefix, a mask over
  [prefix; input] and per-row position ids P_i + t — all owned by :class:`prefixtune.state.PrefixedState`;
* decoder cross-attention: the cross-attention half of an ``EncoderDecoderCache`` filled with the
  prefix and marked not-yet-updated, so the model appends the encoder's keys after it (also the state's);
* encoder self-attention (which takes no cache): a forward pre-hook on each encoder attention module
  passes a one-layer cache holding the prefix, with a 4D mask over [prefix; input].

Rows of one batch may use different prefixes. Shorter prefixes are left-padded to the longest and
the padding is masked, so each row sees exactly its own prefix.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from .errors import PrefixTuneError


@dataclass
class StackPrefix:
    """The prefix of one attention stack for a batch.

    Attributes:
        layers: Per layer, (keys, values), each (B, kv_heads, P_max, D).
        mask: (B, P_max), 1 where a row's prefix has a token; shorter prefixes are left-padded.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)  # (B,)


def gather_rows(tensors: dict[str, torch.Tensor], row_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Build per-row prefixes from each name's tensor, left-padding shorter ones.

    Args:
        tensors: name → (P_name, *shape).
        row_names: One name per row (B names).

    Returns:
        rows (B, P_max, *shape) and mask (B, P_max). A batch of one name is an expanded view,
        not a copy.
    """
    names = list(dict.fromkeys(row_names))
    batch = len(row_names)
    first = tensors[names[0]]
    if len(names) == 1:
        rows = first.unsqueeze(0).expand(batch, *first.shape)  # (B, P, *shape), shared storage
        return rows, torch.ones(batch, first.shape[0], dtype=torch.long, device=first.device)
    p_max = max(tensors[n].shape[0] for n in names)
    padded, masks = [], []
    for n in names:
        t = tensors[n]
        pad = p_max - t.shape[0]
        padded.append(torch.cat([t.new_zeros(pad, *t.shape[1:]), t]) if pad else t)  # (P_max, *shape)
        masks.append(
            torch.cat(
                [
                    torch.zeros(pad, dtype=torch.long, device=t.device),
                    torch.ones(t.shape[0], dtype=torch.long, device=t.device),
                ]
            )
        )
    index = torch.tensor([names.index(n) for n in row_names], device=first.device)
    rows = torch.stack(padded)[index]  # (B, P_max, *shape)
    mask = torch.stack(masks).to(first.device)[index]  # (B, P_max)
    return rows, mask


def positions(prefix_lengths: torch.Tensor, attention_mask: torch.Tensor, past: int = 0) -> torch.Tensor:
    """Position ids of real tokens: row i starts at P_i, counting only unmasked tokens.

    Args:
        prefix_lengths: (B,) prefix length of each row.
        attention_mask: (B, T) mask over the real tokens seen so far (including earlier steps).
        past: How many of those T tokens were already processed; ids are returned for the rest.

    Returns:
        (B, T - past) position ids.
    """
    counted = attention_mask.long().cumsum(dim=1) - 1  # (B, T)
    return (counted.clamp(min=0) + prefix_lengths[:, None])[:, past:]


def bidirectional_mask(config, queries: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """A 4D mask, in the format of the model's attention implementation, from (B, T) queries to keys.

    Args:
        config: The model config (its ``_attn_implementation`` sets the format).
        queries: (B, T, ·) tensor giving batch, query length, dtype and device.
        key_mask: (B, K) 1 for keys to attend to.
    """
    keys = queries.new_zeros(1).expand(key_mask.shape[0], key_mask.shape[1], 1)  # shape only: (B, K, 1)
    mask = create_bidirectional_mask(
        config=config,
        inputs_embeds=queries,
        attention_mask=key_mask,
        encoder_hidden_states=keys,
        allow_is_bidirectional_skip=False,
    )
    if mask is None or not isinstance(mask, torch.Tensor):
        raise PrefixTuneError(
            f"attention implementation {config._attn_implementation!r} is not supported for encoder prefixes; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    return mask


class _LayerPrefix:
    """A one-layer stand-in cache: prepends fixed keys/values to what the layer computes."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, record: list | None = None) -> None:
        self.keys, self.values, self.record = keys, values, record

    def update(self, key_states, value_states, *args, **kwargs):
        if self.record is not None:
            self.record.append((key_states, value_states))
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys.shape[-2]


def find_encoder_attention(encoder: nn.Module, num_layers: int) -> list[nn.Module]:
    """The encoder's self-attention modules, in layer order.

    An attention module is the outermost module whose class name ends in ``Attention`` and whose
    forward takes a ``cache`` argument.
    """
    found: list[nn.Module] = []
    for module in encoder.modules():
        if not type(module).__name__.endswith("Attention") or any(module in f.modules() for f in found):
            continue
        if "cache" in inspect.signature(module.forward).parameters:
            found.append(module)
    if len(found) != num_layers:
        raise PrefixTuneError(
            f"unsupported encoder {type(encoder).__name__}: found {len(found)} self-attention modules taking a "
            f"cache, expected {num_layers}; its attention (local, sparse or fused, as in LED, LongT5, BigBird-Pegasus, "
            "Pegasus-X, FSMT) has no place for the prefix's keys and values"
        )
    return found


class EncoderPrefixHooks:
    """Pre-hooks that hand each encoder self-attention layer its prefix while :meth:`active`."""

    def __init__(self, modules: list[nn.Module], encoder: nn.Module) -> None:
        self._current: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._record: list | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, m in enumerate(modules)]
        # Encoders that expand a 2D mask themselves (Switch Transformers) take the [prefix; input] key mask as is.
        self._takes_2d_mask = "[:, None, None, :]" in inspect.getsource(type(encoder).forward)

    def mask(self, config, queries: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """The encoder's attention mask from (B, T) queries to the (B, P + S) keys [prefix; input]."""
        return key_mask if self._takes_2d_mask else bidirectional_mask(config, queries, key_mask)

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            if self._current is None:
                return None
            kwargs["cache"] = _LayerPrefix(*self._current[index], record=self._record)
            return args, kwargs

        return hook

    @contextmanager
    def active(self, layers: list[tuple[torch.Tensor, torch.Tensor]], record: list | None = None):
        """Within the block, layer i attends to ``layers[i]`` first; ``record`` collects what each
        layer computes itself, as (keys, values)."""
        self._current, self._record = layers, record
        try:
            yield
        finally:
            self._current, self._record = None, None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class DecoderPositions:
    """Per-row decoder positions for encoder-decoder models that embed absolute positions from the
    cache length (the BART family: BART, mBART, PLBart, Marian, Pegasus, Blenderbot).

    Their decoder gives every row the positions ``cache_length + t``, which is right only when all
    rows hold equally long prefixes and histories. A forward hook on the position embedding (an
    ``nn.Embedding``: output = weight[position + offset]) replaces them, while :meth:`rows` is
    active, by each row's own positions, so prefixes of different lengths and rows that joined a
    running batch later share one batch exactly.
    """

    def __init__(self, module: nn.Embedding) -> None:
        self._rows: torch.Tensor | None = None
        self._offset = getattr(module, "offset", 0)
        self._handle = module.register_forward_hook(self._hook)

    @classmethod
    def find(cls, decoder: nn.Module) -> DecoderPositions | None:
        module = getattr(decoder, "embed_positions", None)
        return cls(module) if isinstance(module, nn.Embedding) else None

    def _hook(self, module, args, output):
        if self._rows is None:
            return None
        return nn.functional.embedding(self._rows + self._offset, module.weight).to(output.dtype)  # (B, T, d)

    @contextmanager
    def rows(self, positions: torch.Tensor):
        """Within the block, the decoder's tokens sit at ``positions`` (B, T)."""
        self._rows = positions
        try:
            yield
        finally:
            self._rows = None


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def contiguous_head(base: nn.Module) -> None:
    """Hand the output layer contiguous rows. Asked for the last position's logits, a model slices its states
    to a strided (B, 1, H) view of (B, T, H); a linear layer on that view multiplies row by row against a
    broadcast weight (17 GFLOP/s on a 2-core Xeon, against 130+ for one matrix product: 0.2 s of each 64-row
    prefill of the default model). Same values, one matrix product."""
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if isinstance(head, nn.Linear) and not getattr(head, "_prefixtune_contiguous", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._prefixtune_contiguous = True
