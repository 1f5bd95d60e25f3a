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
_ENC_DEC_FIELDS.update({family: _T5_FIELDS for family in ("t5", "mt5", "umt5", "longt5")})


@dataclass(frozen=True)
class StackGeometry:
    """One attention stack that receives a prefix.

    Attributes:
        name: ``"decoder"``, ``"encoder"`` or ``"cross"``.
        num_layers: Attention layers in the stack (L).
        num_kv_heads: Key/value heads per layer (fewer than query heads under GQA).
        head_dim: Size of one head (D).
    """

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        """Width of one token's keys (or values) in one layer: kv_heads × head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def token_shape(self) -> tuple[int, int, int, int]:
        """Shape of one virtual token's prefix: (L, 2, kv_heads, D)."""
        return (self.num_layers, 2, self.num_kv_heads, self.head_dim)

    @property
    def token_size(self) -> int:
        """Number of values for one virtual token: L × 2 × kv_dim."""
        return self.num_layers * 2 * self.kv_dim


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
            "stacks": {s.name: list(s.token_shape) for s in self.stacks},
        }


def _first(config, names: tuple[str, ...], what: str, required: bool = True):
    for name in names:
        value = getattr(config, name, None)
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
    n_heads = _first(config, heads, "attention heads")
    head_dim = _first(config, hd, "head dim", required=False) or hidden // n_heads
    stack = StackGeometry(
        "decoder", _first(config, layers, "layer count"), _first(config, kv_heads, "kv heads"), head_dim
    )
    return Geometry(model_type, False, hidden, (stack,))
