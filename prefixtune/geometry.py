"""Attention geometry of a base model, read once from its config.

A prefix (Li & Liang 2021, §4) holds one key and one value vector per virtual token, per layer and
per key/value head, for every attention stack that reads it. Decoder-only models have one stack
(``decoder``); encoder-decoder models have three, as in the paper's BART setup: ``encoder``
(encoder self-attention), ``decoder`` (decoder self-attention) and ``cross`` (decoder
cross-attention).

Every architecture quirk about *where the numbers live in the config* sits in ``_FIELDS`` below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import PrefixTuneError

# Config attribute names per family: (layers, kv heads, attention heads, head dim, hidden size).
# The first name present wins. Decoder-only families that follow the Llama naming need no entry.
_DECODER_FIELDS = {
    "default": (
        ("num_hidden_layers", "n_layer", "num_layers"),
        ("num_key_value_heads", "multi_query_group_num", "num_attention_heads", "n_head"),
        ("num_attention_heads", "n_head"),
        ("head_dim", "kv_channels"),
        ("hidden_size", "n_embd", "d_model"),
    ),
}
# Encoder-decoder families: (encoder layers, decoder layers, encoder heads, decoder heads, head dim).
_ENC_DEC_FIELDS = {
    "default": (
        ("encoder_layers",),
        ("decoder_layers",),
        ("encoder_attention_heads",),
        ("decoder_attention_heads",),
        (),
    ),
}
_T5_FIELDS = (("num_layers",), ("num_decoder_layers",), ("num_heads",), ("num_heads",), ("d_kv",))
_ENC_DEC_FIELDS.update({family: _T5_FIELDS for family in ("t5", "mt5", "umt5", "longt5", "switch_transformers")})


@dataclass(frozen=True)
class StackGeometry:
    """One attention stack that receives a prefix.

    What the model caches per token and layer is what the prefix holds: keys (kv_heads, D) and
    values (kv_heads, D_v). Under multi-head latent attention (DeepSeek-V2/V3) the cache holds the
    compressed latents instead — one "head" of width ``kv_lora_rank`` and the rotary key of width
    ``qk_rope_head_dim`` — and so does the prefix. Layers may differ from one another (Gemma 4's
    global layers have wider heads than its sliding ones; MiMo-V2-Flash's have more heads): then
    ``per_layer`` lists each layer's (kv_heads, D, D_v) and one token's prefix is flat.

    Attributes:
        name: ``"decoder"``, ``"encoder"`` or ``"cross"``.
        num_layers: Attention layers in the stack (L).
        num_kv_heads: Key/value heads per layer (fewer than query heads under GQA); the first layer's
            when layers differ.
        head_dim: Width of one head's keys (D); the first layer's when layers differ.
        value_dim: Width of one head's values (D_v); None when equal to ``head_dim``.
        per_layer: Each layer's (kv_heads, D, D_v) when layers differ; None when they are all alike.
    """

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    value_dim: int | None = None
    per_layer: tuple[tuple[int, int, int], ...] | None = None

    @classmethod
    def from_layers(cls, name: str, shapes: list[tuple[int, int, int]]) -> StackGeometry:
        """A stack from each layer's (kv_heads, D, D_v): uniform layouts when the layers agree."""
        heads, key_dim, value_dim = shapes[0]
        uniform = len(set(shapes)) == 1
        return cls(
            name,
            len(shapes),
            heads,
            key_dim,
            value_dim if value_dim != key_dim else None,
            None if uniform else tuple(tuple(s) for s in shapes),
        )

    @property
    def v_dim(self) -> int:
        return self.value_dim if self.value_dim is not None else self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of one token's keys in one layer: kv_heads × head_dim."""
        return self.num_kv_heads * self.head_dim

    def layer_shapes(self) -> list[tuple[int, int, int]]:
        """Every layer's (kv_heads, D, D_v)."""
        if self.per_layer is not None:
            return list(self.per_layer)
        return [(self.num_kv_heads, self.head_dim, self.v_dim)] * self.num_layers

    @property
    def token_shape(self) -> tuple[int, ...]:
        """Shape of one virtual token's prefix: (L, 2, kv_heads, D); (L, kv_heads, D + D_v) when keys and
        values differ in width; (Σ_l kv_heads_l × (D_l + D_v,l),) when layers differ."""
        if self.per_layer is not None:
            return (self.token_size,)
        if self.v_dim == self.head_dim:
            return (self.num_layers, 2, self.num_kv_heads, self.head_dim)
        return (self.num_layers, self.num_kv_heads, self.head_dim + self.v_dim)

    @property
    def token_size(self) -> int:
        """Number of values for one virtual token: Σ_l kv_heads × (D + D_v)."""
        return sum(h * (k + v) for h, k, v in self.layer_shapes())

    def split(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B, P, *token_shape) → per layer (keys (B, H, P, D), values (B, H, P, D_v))."""
        if self.per_layer is not None:
            out, start = [], 0
            for heads, key_dim, value_dim in self.per_layer:
                width = heads * (key_dim + value_dim)
                layer = rows[..., start : start + width].unflatten(-1, (heads, key_dim + value_dim)).transpose(1, 2)
                out.append((layer[..., :key_dim], layer[..., key_dim:]))  # (B, H, P, D), (B, H, P, D_v)
                start += width
            return out
        if self.v_dim == self.head_dim:
            kv = rows.permute(2, 3, 0, 4, 1, 5)  # (L, 2, B, H, P, D)
            return [(layer[0], layer[1]) for layer in kv]
        kv = rows.permute(2, 0, 3, 1, 4)  # (L, B, H, P, D + D_v)
        return [(layer[..., : self.head_dim], layer[..., self.head_dim :]) for layer in kv]

    def join(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Per layer (keys (H, P, D), values (H, P, D_v)) of one row → (P, *token_shape)."""
        if self.per_layer is not None:
            flat = [torch.cat([k, v], dim=-1).transpose(0, 1).flatten(1) for k, v in layers]  # (P, H × (D + D_v))
            return torch.cat(flat, dim=-1)
        if self.v_dim == self.head_dim:
            kv = torch.stack([torch.stack([k, v]) for k, v in layers])  # (L, 2, H, P, D)
            return kv.permute(3, 0, 1, 2, 4)
        kv = torch.stack([torch.cat([k, v], dim=-1) for k, v in layers])  # (L, H, P, D + D_v)
        return kv.permute(2, 0, 1, 3)

    def describe(self) -> list:
        """What a prefix file records of this stack: its token shape, or each layer's (kv_heads, D, D_v)."""
        if self.per_layer is not None:
            return [list(s) for s in self.per_layer]
        return list(self.token_shape)


@dataclass(frozen=True)
class Geometry:
    """The attention geometry of a whole model.

    Attributes:
        model_type: The config's ``model_type``.
        is_encoder_decoder: Whether the model has an encoder and a decoder.
        hidden_size: Width of token embeddings (d), the input size of the prefix MLP.
        stacks: The attention stacks that take a prefix, decoder first.
    """

    model_type: str
    is_encoder_decoder: bool
    hidden_size: int
    stacks: tuple[StackGeometry, ...]

    def stack(self, name: str) -> StackGeometry:
        for s in self.stacks:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "is_encoder_decoder": self.is_encoder_decoder,
            "hidden_size": self.hidden_size,
            "stacks": {s.name: s.describe() for s in self.stacks},
        }


def _first(config, names: tuple[str, ...], what: str, required: bool = True):
    for name in names:
        try:
            value = getattr(config, name, None)
        except Exception:  # noqa: BLE001 - e.g. per-layer attributes that transformers refuses to give globally
            value = None
        if isinstance(value, int) and value > 0:
            return value
    if required:
        raise PrefixTuneError(
            f"unsupported model: config of model_type={getattr(config, 'model_type', '?')!r} has no "
            f"{what} (looked for {', '.join(names)}); prefixtune needs it to size the prefix"
        )
    return None


def read_geometry(config) -> Geometry:
    """Read the attention geometry from a Hugging Face config.

    Args:
        config: A ``transformers.PretrainedConfig``.

    Returns:
        The model's :class:`Geometry`.

    Raises:
        PrefixTuneError: If a needed field is missing, naming it.
    """
    model_type = getattr(config, "model_type", "?")
    if not getattr(config, "is_encoder_decoder", False) and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)  # multimodal wrappers: the language model's config
    if getattr(config, "is_encoder_decoder", False) and hasattr(getattr(config, "encoder", None), "to_dict"):
        raise PrefixTuneError(
            f"unsupported model {model_type!r}: its encoder and decoder are separate models with configs of their "
            "own (EncoderDecoderModel, T5Gemma); prefixtune's encoder-decoder path reads one config"
        )
    if getattr(config, "is_encoder_decoder", False):
        enc_l, dec_l, enc_h, dec_h, hd = _ENC_DEC_FIELDS.get(model_type, _ENC_DEC_FIELDS["default"])
        hidden = _first(config, ("d_model", "hidden_size"), "hidden size")
        enc_heads = _first(config, enc_h, "encoder attention heads")
        dec_heads = _first(config, dec_h, "decoder attention heads")
        head_dim = _first(config, hd, "head dim", required=False) if hd else None
        enc_dim = head_dim or hidden // enc_heads
        dec_dim = head_dim or hidden // dec_heads
        n_enc = _first(config, enc_l, "encoder layers")
        n_dec = _first(config, dec_l, "decoder layers", required=False) or n_enc
        stacks = (
            StackGeometry("decoder", n_dec, dec_heads, dec_dim),
            StackGeometry("encoder", n_enc, enc_heads, enc_dim),
            StackGeometry("cross", n_dec, dec_heads, dec_dim),
        )
        return Geometry(model_type, True, hidden, stacks)
    layers, kv_heads, heads, hd, hs = _DECODER_FIELDS.get(model_type, _DECODER_FIELDS["default"])
    hidden = _first(config, hs, "hidden size")
    latent = _first(config, ("kv_lora_rank",), "latent width", required=False)
    if latent is not None:  # multi-head latent attention: the cache holds (latent, rotary key) per token
        rope = _first(config, ("qk_rope_head_dim",), "rotary key width")
        stack = StackGeometry("decoder", _first(config, layers, "layer count"), 1, latent, rope)
        return Geometry(model_type, False, hidden, (stack,))
    n_heads = _first(config, heads, "attention heads")
    head_dim = _first(config, hd, "head dim", required=False) or hidden // n_heads
    stack = StackGeometry(
        "decoder", _first(config, layers, "layer count"), _first(config, kv_heads, "kv heads"), head_dim
    )
    return Geometry(model_type, False, hidden, (stack,))
