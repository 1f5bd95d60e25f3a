"""The prefixed decoding state: the one place that knows how a batch's prefix sits in the model.

Li & Liang 2021 (§4.2) feed the prefix as already-computed keys and values. A batch's
:class:`PrefixedState` owns everything that follows from that: transformers' cache holding the
prefix (and everything seen since), the mask over the cached keys, each key's position id, and for
encoder-decoder models the encoder states and the cross-attention mask. ``model.forward``,
:mod:`prefixtune.generation` (greedy, sampling, beam search) and the server's engine all go through
it; nothing else touches transformers' cache internals.

Layout of a row's keys: ``[padding | prefix | padding | tokens]`` — shorter prefixes and inputs are
left-padded and the padding is masked. Each key slot carries its row's own position id (the prefix
at 0..P_i-1, tokens from P_i on), so attention that depends on distance — sliding windows (Gemma 2/3,
Mistral, gpt-oss), chunked attention (Llama 4) — is masked by positions, not slots, and every row
computes exactly what it would alone. Such layers keep their whole history in the cache (no
window-sized ring), which keeps the identity "prefix ≡ that prompt" exact.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutput

from .errors import PrefixTuneError
from .injection import StackPrefix, bidirectional_mask, positions
from .kvcache import GrowingLayer
from .layout import AttentionLayout, self_attention_mask
from .lean import step_for


@dataclass
class _EncoderOutput(BaseModelOutput):
    """The encoder's states as the model's forward takes them, with the fields decoders read beyond
    ``last_hidden_state`` empty, as when the encoder did not return them (NLLB-MoE reads router logits)."""

    router_logits: tuple | None = None


# ---------------------------------------------------------------------- caches
def _filled_layer(keys: torch.Tensor, values: torch.Tensor) -> GrowingLayer:
    """A cache layer holding the prefix that keeps its whole history."""
    layer = GrowingLayer()
    layer.update(keys, values)
    return layer


def _filled(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding the prefix at every layer (encoder-decoder self- and cross-attention)."""
    cache = DynamicCache()
    cache.layers = [_filled_layer(k, v) for k, v in layers]
    return cache


class _ReadOnlyPrefixLayer(DynamicLayer):
    """A cache layer that holds only the prefix: ``update`` returns [prefix; new] without storing.

    Used for training passes, which need no cache afterwards. Having no side effect, it is safe to
    run twice, as gradient checkpointing does when it recomputes a layer in the backward pass.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def _prefix_cache(model, layers: list[tuple[torch.Tensor, torch.Tensor]], keep: bool) -> DynamicCache:
    """A decoder-only cache holding the prefix at every attention layer (each keeps its whole history;
    with ``keep=False`` they store nothing). Recurrent layers of hybrid models get their usual empty state."""
    make = _filled_layer if keep else _ReadOnlyPrefixLayer
    return _decoder_cache(model, [make(k, v) for k, v in layers])


def _decoder_cache(model, attention_layers: list) -> DynamicCache:
    """A decoder-only cache with ``attention_layers`` at the model's attention layers; the recurrent layers
    of hybrid models get their usual empty state, as transformers builds it from the config."""
    layout = model.layout
    if not layout.sparse:
        cache = DynamicCache()
        cache.layers = attention_layers
        return cache
    cache = DynamicCache(config=model.base.config)
    for index, layer in zip(layout.attention_indices, attention_layers):
        cache.layers[index] = layer
    return cache


def _attention_layers(cache, layout: AttentionLayout | None) -> list:
    if layout is None or not layout.sparse:
        return list(cache.layers)
    return [cache.layers[i] for i in layout.attention_indices]


def read_prefix(cache, stack, layout: AttentionLayout | None = None) -> torch.Tensor:
    """A batch-1 cache's attention layers → the prefix tensor (P, *token_shape) of ``stack`` (a StackGeometry)."""
    layers = _attention_layers(cache, layout)
    if len(layers) != stack.num_layers:
        raise PrefixTuneError(f"the model cached {len(layers)} layers, expected {stack.num_layers}")
    return stack.join([(layer.keys[0], layer.values[0]) for layer in layers])


def decoder_start(base) -> int:
    """The token an encoder-decoder model's decoder starts from, found as Hugging Face ``generate`` finds it:
    ``decoder_start_token_id`` (config, then generation config), else ``bos_token_id``."""
    configs = (base.config, getattr(base, "generation_config", None))
    for name in ("decoder_start_token_id", "bos_token_id"):
        for config in configs:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
    raise PrefixTuneError("the model config sets no decoder_start_token_id; set model.config.decoder_start_token_id")


def cached_shapes(cache, layout: AttentionLayout | None = None) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per attention layer, the shapes of the keys and values a cache holds."""
    return [(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in _attention_layers(cache, layout)]


def new_cache(model) -> DynamicCache:
    """An empty decoder-only cache whose attention layers keep their whole history (to read a prompt's)."""
    return _decoder_cache(model, [GrowingLayer() for _ in model.layout.attention_indices])


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    if (missing := width - t.shape[dim]) == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


# ---------------------------------------------------------------------- the state
_UNCHECKED = object()


class PrefixedState:
    """What a batch carries through the model, one row per sequence (or beam).

    Attributes:
        model: The :class:`prefixtune.PrefixTunedModel`.
        cache: transformers' cache (prefix + everything seen).
        mask: (B, K) 1 where a (decoder self-attention) key slot holds a real token.
        key_pos: (B, K) position id of each key slot (decoder-only models).
        next_pos: (B,) position id of the next token (decoder-only models).
        encoder_hidden: (B, S, d) encoder states (encoder-decoder models).
        cross_keys: (B, P_cross + S) 1 for the cross-attention keys a row attends to (encoder-decoder models).
        cross_mask: ``cross_keys`` as the model's 4D mask (B, 1, 1, P_cross + S).
    """

    def __init__(
        self, model, cache, mask, key_pos=None, next_pos=None, encoder_hidden=None, cross_keys=None, keeps=True
    ):
        self.model, self.cache, self.mask, self.keeps = model, cache, mask, keeps
        self.key_pos, self.next_pos = key_pos, next_pos
        self.encoder_hidden, self.cross_keys = encoder_hidden, cross_keys
        self.cross_mask, self._lean = None, _UNCHECKED
        if cross_keys is not None:
            queries = encoder_hidden.new_zeros(len(cross_keys), 1, 1)  # shape only
            self.cross_mask = bidirectional_mask(model.base.config, queries, cross_keys)

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    # ------------------------------------------------------------------ construction
    @classmethod
    def causal(cls, model, dec: StackPrefix, keep: bool = True) -> PrefixedState:
        """A decoder-only batch holding only its prefix; ``keep=False`` stores nothing (training passes)."""
        cache = _prefix_cache(model, dec.layers, keep)
        lengths = dec.lengths  # (B,)
        width = dec.mask.shape[1]
        key_pos = (torch.arange(width, device=dec.mask.device) - (width - lengths[:, None])).clamp(min=0)
        mask = dec.mask.long()
        return cls(model, cache, mask, key_pos=key_pos * mask, next_pos=lengths.clone(), keeps=keep)

    @classmethod
    def seq2seq(cls, model, batch: dict, encoder_hidden, cross_key_mask) -> PrefixedState:
        """An encoder-decoder batch after its encoder pass, before the first decoder token."""
        rows = encoder_hidden.shape[0]
        if "embedding" in batch:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            mask = torch.zeros(rows, 0, dtype=torch.long, device=encoder_hidden.device)
        else:
            cache = EncoderDecoderCache(_filled(batch["decoder"].layers), _filled(batch["cross"].layers))
            for i in cache.is_updated:  # the model appends the encoder's keys after the cross prefix
                cache.is_updated[i] = False
            mask = batch["decoder"].mask.long()
        return cls(model, cache, mask, encoder_hidden=encoder_hidden, cross_keys=cross_key_mask.long())

    @property
    def is_seq2seq(self) -> bool:
        return self.encoder_hidden is not None

    # ------------------------------------------------------------------ passes
    def causal_inputs(self, input_mask: torch.Tensor, queries: torch.Tensor) -> dict:
        """Record T new tokens per row and return the model arguments that place them after the state.

        Args:
            input_mask: (B, T) 1 for real tokens (left padding allowed).
            queries: (B, T, ·) giving the dtype and device of the pass.
        """
        new_pos = self._record(input_mask)
        layout = self.model.layout
        return {
            "attention_mask": self_attention_mask(
                self.model.base.config, layout, queries, self.mask, self.key_pos, self.cache
            ),
            "position_ids": new_pos,
            "cache": self.cache,
        }

    def _record(self, input_mask: torch.Tensor) -> torch.Tensor:
        """Decoder-only: append (B, T) new tokens' key slots; returns their position ids (B, T)."""
        input_mask = input_mask.long()
        new_pos = positions(self.next_pos, input_mask)
        self.mask = torch.cat([self.mask, input_mask], dim=1)
        self.key_pos = torch.cat([self.key_pos, new_pos * input_mask], dim=1)
        self.next_pos = self.next_pos + input_mask.sum(dim=1)
        return new_pos

    def run_decoder(self, decoder_input_ids: torch.Tensor, decoder_mask: torch.Tensor, **kwargs):
        """Encoder-decoder: one decoder pass over (B, T) tokens after what the state holds; records them.

        Each row's tokens take its own next positions (its prefix and history, not the batch's
        padded width): through the position hook where the decoder embeds absolute positions, and
        by right-aligned keys where positions are relative (T5).
        """
        decoder_mask = decoder_mask.long()
        rows_pos = positions(self.mask.sum(dim=1), decoder_mask)  # (B, T)
        self.mask = torch.cat([self.mask, decoder_mask], dim=1)
        hook = self.model.decoder_positions
        cross_mask = self.cross_mask  # (B, 1, 1, K) → (B, 1, T, K): some attention modules (MVP) check the shape
        if cross_mask is not None and cross_mask.dim() == 4:
            cross_mask = cross_mask.expand(-1, -1, decoder_input_ids.shape[1], -1)
        with hook.rows(rows_pos) if hook is not None else nullcontext():
            return self.model.base(
                encoder_outputs=_EncoderOutput(last_hidden_state=self.encoder_hidden),
                attention_mask=cross_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=self.mask,
                cache=self.cache,
                use_cache=True,
                **kwargs,
            )

    @classmethod
    def prefill(cls, model, input_ids, attention_mask, prefix) -> tuple[PrefixedState, torch.Tensor]:
        """Process each row's inputs after its prefix.

        Args:
            input_ids: (B, T) left-padded inputs (the source, for encoder-decoder models).
            prefix: A prefix name, one per row, or None for the active prefix.

        Returns:
            The state and the logits (B, V) for the first new token.
        """
        if not model.geometry.is_encoder_decoder:
            state = cls.begin(model, prefix, input_ids.shape[0])
            return state, state.feed(input_ids, attention_mask)
        batch = model.batch_prefix(prefix, input_ids.shape[0])
        hidden, key_mask = model.encode(input_ids, attention_mask, batch)
        state = cls.seq2seq(model, batch, hidden, key_mask)
        start = torch.full((input_ids.shape[0],), decoder_start(model.base), device=model.device)
        return state, state.extend(start)

    @classmethod
    def begin(cls, model, prefix, rows: int) -> PrefixedState:
        """Decoder-only: ``rows`` rows holding only their prefixes, for :meth:`feed` to continue."""
        return cls.causal(model, model.batch_prefix(prefix, rows)["decoder"])

    def feed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Decoder-only: (B, T) more prompt tokens (all, or the next chunk) → logits (B, V) of the last one."""
        if (lean := self._lean_step()) is not None:  # Llama-family models: the same pass, fewer operations
            return self._lean_pass(lean, input_ids, attention_mask)
        return self.model.run_causal(input_ids, attention_mask, self, logits_to_keep=1).logits[:, -1]

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns the logits (B, V) for the next one."""
        ones = torch.ones(len(tokens), 1, dtype=torch.long, device=tokens.device)
        base = self.model.base
        if self.is_seq2seq:
            out = self.run_decoder(tokens[:, None], ones)
        elif (lean := self._lean_step()) is not None:  # Llama-family models: the same step, fewer operations
            return self._lean_pass(lean, tokens[:, None], ones)
        else:
            queries = torch.zeros(len(tokens), 1, 1, device=tokens.device, dtype=self.model.dtype)  # shape only
            out = base(input_ids=tokens[:, None], use_cache=True, **self.causal_inputs(ones, queries))
        return out.logits[:, -1]

    def _lean_pass(self, lean, input_ids: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
        """Decoder-only: (B, T) tokens through the lean step (:mod:`prefixtune.lean`) → logits (B, V) of the last."""
        new_pos = self._record(input_mask)
        return lean(input_ids, new_pos, self.mask, _attention_layers(self.cache, self.model.layout))

    def _lean_step(self):
        """:func:`prefixtune.lean.step_for`, checked once per state (it walks every weight and module)."""
        if torch.is_grad_enabled():
            return None
        if self._lean is _UNCHECKED:
            self._lean = step_for(self.model)
        return self._lean

    # ------------------------------------------------------------------ rows
    def select(self, index: torch.Tensor) -> None:
        """Keep (and repeat) rows ``index`` (B',): beam reordering and expansion, rows leaving."""
        self.cache.reorder_cache(index)
        self.mask = self.mask[index]
        for name in ("key_pos", "next_pos", "encoder_hidden", "cross_keys", "cross_mask"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index])

    def trim(self) -> None:
        """Drop leading (self-attention) key slots that no row attends to, after rows have left the batch."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start == 0:
            return
        cache = self.cache.self_attention_cache if self.is_seq2seq else self.cache
        for layer in _attention_layers(cache, None if self.is_seq2seq else self.model.layout):
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        self.mask = self.mask[:, start:]
        if self.key_pos is not None:
            self.key_pos = self.key_pos[:, start:]

    @classmethod
    def merge(cls, states: list[PrefixedState]) -> PrefixedState:
        """Stack states into one batch (continuous batching): rows keep exactly what they would compute alone.

        Shorter histories are left-padded with masked zeros. Decoder-only rows carry their positions
        per key; encoder-decoder rows (each past its first decoder step) carry their cross-attention
        keys, padded the same way, and their decoder positions per row (see :meth:`run_decoder`).
        """
        first = states[0]
        if first.model.layout.recurrent:
            raise PrefixTuneError("states of models with recurrent layers cannot be merged; decode them together")
        width = max(s.mask.shape[1] for s in states)
        mask = torch.cat([_pad_left(s.mask, width, 1) for s in states])
        if not first.is_seq2seq:
            return cls(
                first.model,
                _prefix_cache(first.model, _stacked([s.cache for s in states], width, first.model.layout), keep=True),
                mask,
                key_pos=torch.cat([_pad_left(s.key_pos, width, 1) for s in states]),
                next_pos=torch.cat([s.next_pos for s in states]),
            )
        if not all(all(s.cache.is_updated.values()) for s in states):
            raise PrefixTuneError("encoder-decoder states merge after their first decoder step (see prefill)")
        cross_width = max(s.cross_keys.shape[1] for s in states)
        cache = EncoderDecoderCache(
            _filled(_stacked([s.cache.self_attention_cache for s in states], width)),
            _filled(_stacked([s.cache.cross_attention_cache for s in states], cross_width)),
        )
        for i in cache.is_updated:
            cache.is_updated[i] = True
        source = max(s.encoder_hidden.shape[1] for s in states)
        return cls(
            first.model,
            cache,
            mask,
            encoder_hidden=torch.cat([_pad_left(s.encoder_hidden, source, 1) for s in states]),
            cross_keys=torch.cat([_pad_left(s.cross_keys, cross_width, 1) for s in states]),
        )


def _stacked(caches: list, width: int, layout: AttentionLayout | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Per attention layer, the keys and values of the rows of ``caches``, each left-padded to ``width`` keys."""
    out = []
    for layers in zip(*(_attention_layers(c, layout) for c in caches)):
        keys = torch.cat([_pad_left(layer.keys, width, 2) for layer in layers])  # (B, H, S, D)
        values = torch.cat([_pad_left(layer.values, width, 2) for layer in layers])
        out.append((keys, values))
    return out
