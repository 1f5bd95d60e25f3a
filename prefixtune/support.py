"""What ``wrap`` checks before it accepts a model: the shapes the model caches, and that it honours a prefix.

Decoder-only models only (encoder-decoder stacks are read from the config). One token through the
model gives every attention layer's key and value shapes; then a few passes over 5 tokens check
that a prompt's keys and values, given as a prefix, reproduce the prompt, and that a batch mixing
prefix lengths over padded inputs equals each row alone. A model that fails is refused with the
reason, instead of decoding something else.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from .config import PrefixConfig
from .errors import PrefixTuneError
from .geometry import Geometry, StackGeometry
from .prefix import Prefix
from .state import cached_shapes, new_cache


def _close(got: torch.Tensor, want: torch.Tensor, message: str, dtype: torch.dtype) -> None:
    """Raise ``message`` unless ``got`` equals ``want`` up to rounding: 0.02% of the logits' scale in fp32
    (TF32 matmuls included), 5% in 16-bit types."""
    scale = want.abs().max().clamp(min=1.0) * (2e-4 if dtype == torch.float32 else 5e-2)
    if got.shape != want.shape or not torch.isfinite(got).all() or (got - want).abs().max() > scale:
        raise PrefixTuneError(message)


@torch.no_grad()
def geometry_from_cache(model) -> Geometry:
    """Decoder-only: the prefix holds what the model itself caches per layer and token.

    One token is run through the model and the key and value shapes of every layer are read
    from its cache, so multi-query models that declare more heads than they cache (Falcon,
    GPTBigCode), unusual head widths and latent attention all get the prefix the model uses.
    """
    if any(p.is_meta for p in model.base.parameters()):
        return model.geometry
    name = model.geometry.model_type
    try:
        out = model.base(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), cache=new_cache(model))
    except (ValueError, TypeError) as e:
        raise PrefixTuneError(f"unsupported model {name!r}: it does not run with transformers' cache ({e})") from e
    cache = getattr(out, "cache", None)
    if cache is None:
        raise PrefixTuneError(
            f"unsupported model {name!r}: it returns no cache of keys and values, so a prefix cannot enter it "
            "(encoder models used as decoders need is_decoder=True and cache support)"
        )
    shapes = cached_shapes(cache, model.layout)
    layers = len(model.layout.attention_indices)
    if len(shapes) != layers or len(set(shapes)) != 1:
        raise PrefixTuneError(
            f"unsupported model {name!r}: its {len(shapes)} attention layers cache keys and values of shapes "
            f"{sorted(set(shapes))}; prefixtune needs every layer to cache one shape ({layers} expected)"
        )
    (_, heads, _, key_dim), (_, value_heads, _, value_dim) = shapes[0]
    if heads != value_heads:
        raise PrefixTuneError(f"unsupported model {name!r}: {heads} key heads but {value_heads} value heads")
    found = StackGeometry("decoder", layers, heads, key_dim, value_dim if value_dim != key_dim else None)
    if model.layout.recurrent:
        warnings.warn(
            f"{name}: the prefix enters its {layers} attention layers only; its "
            f"{model.layout.num_layers - layers} recurrent layers ({', '.join(model.layout.recurrent_types)}) "
            "start from their usual empty state, so a prefix is not the same as a prompt there",
            stacklevel=4,
        )
    return dataclasses.replace(model.geometry, stacks=(found,))


@torch.no_grad()
def self_check(model) -> None:
    """Decoder-only: refuse a model that does not honour a prefix, instead of computing something else.

    A 3-token prompt's keys and values, given as a prefix, must reproduce that prompt (§7.2's
    identity), and a batch mixing that prefix with a 2-token one over padded inputs must equal
    each row alone. A few forward passes over 5 tokens.
    """
    if any(p.is_meta for p in model.base.parameters()):
        return
    vocab = model.base.get_input_embeddings().num_embeddings
    words = torch.arange(3, 6, device=model.device)[None] % vocab  # (1, 3)
    inputs = torch.arange(6, 10, device=model.device)[None] % vocab  # (1, 4)
    name = model.geometry.model_type
    parts = [("check3", words), ("check2", words[:, :2])]
    try:
        for part, ids in parts:
            prefix = Prefix(PrefixConfig(num_virtual_tokens=ids.shape[1], reparameterize=False), model.geometry)
            prefix.parts["decoder"].fit(model._activations(ids, "kv")["decoder"].float())
            model.put_prefix(part, prefix.to(model.dtype))
        got = model(inputs, prefix="check3").logits.float()
        want = model.base(input_ids=torch.cat([words, inputs], dim=1)).logits[:, 3:].float()
        if model.layout.recurrent:  # recurrent layers do not see the prefix: no prompt identity to check
            want = got
        _close(
            got,
            want,
            f"unsupported model {name!r}: a prompt's keys and values, given as a prefix, do not "
            "reproduce the prompt (the model computes attention in a way a prefix cannot enter)",
            model.dtype,
        )
        ids = torch.cat([inputs, torch.zeros_like(inputs[:, :2])], dim=1).repeat(2, 1)  # (2, 6), right-padded
        ids[1] = torch.roll(ids[1], 2)
        mask = (torch.arange(6, device=model.device) < 4).long().repeat(2, 1)
        mask[1] = torch.roll(mask[1], 2)
        mixed = model(ids, mask, prefix=["check3", "check2"]).logits.float()
        alone = model(inputs, prefix="check2").logits.float()
        _close(
            mixed[1, 2:][None],
            alone,
            f"unsupported model {name!r}: a batch mixing prefix lengths over padded "
            "inputs differs from each row alone (the model does not honour the attention mask or positions)",
            model.dtype,
        )
        _close(
            mixed[0, :4][None],
            got,
            f"unsupported model {name!r}: a batch row differs from the same row alone",
            model.dtype,
        )
    finally:
        for part, _ in parts:
            if model.has_prefix(part):
                model.remove_prefix(part)
