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


def _tolerance(dtype: torch.dtype) -> float:
    """Rounding allowed, relative to the logits' scale: 0.02% in fp32 (TF32 matmuls included), 5% in 16-bit."""
    return 2e-4 if dtype == torch.float32 else 5e-2


def _row_tolerance(dtype: torch.dtype) -> float:
    """A batch row against the same row alone, relative to the logits' scale: the same kernels see the same
    numbers, so in fp32 they agree to 1e-5 (exactly on CPU), unless TF32 matmuls are allowed."""
    tf32 = torch.get_float32_matmul_precision() != "highest" or torch.backends.cuda.matmul.allow_tf32
    return 1e-5 if dtype == torch.float32 and not tf32 else _tolerance(dtype)


def _close(got: torch.Tensor, want: torch.Tensor, message: str, dtype: torch.dtype) -> None:
    """Raise ``message`` unless ``got`` equals ``want`` up to rounding (:func:`_tolerance`)."""
    scale = want.abs().max().clamp(min=1.0) * _tolerance(dtype)
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
    if len(shapes) != layers:
        raise PrefixTuneError(
            f"unsupported model {name!r}: it caches keys and values for {len(shapes)} layers but has {layers} "
            "attention layers (layers that share another layer's cache cannot take a prefix of their own)"
        )
    if shapes and shapes[0][0][2] != 1:
        raise PrefixTuneError(
            f"unsupported model {name!r}: one input token left {shapes[0][0][2]} positions in its cache (the model "
            "adds tokens of its own, such as CPM-Ant's prompt), so a prefix would not sit where a prompt does"
        )
    per_layer = []
    for (_, heads, _, key_dim), (_, value_heads, _, value_dim) in shapes:
        if heads != value_heads:
            raise PrefixTuneError(f"unsupported model {name!r}: {heads} key heads but {value_heads} value heads")
        per_layer.append((heads, key_dim, value_dim))
    found = StackGeometry.from_layers("decoder", per_layer)
    if model.layout.recurrent:
        warnings.warn(
            f"{name}: the prefix enters its {layers} attention layers only; its "
            f"{model.layout.num_recurrent} recurrent layers ({', '.join(model.layout.recurrent_types)}) "
            "start from their usual empty state, so a prefix is not the same as a prompt there",
            stacklevel=4,
        )
    return dataclasses.replace(model.geometry, stacks=(found,))


@torch.no_grad()
def self_check(model) -> None:
    """Decoder-only: refuse a model that does not honour a prefix, instead of computing something else.

    An 8-token prompt's keys and values, given as a prefix, must reproduce that prompt (§7.2's
    identity), and a batch mixing that prefix with a 2-token one over padded inputs must equal
    each row alone, as exactly as rows with equal prefixes do (RoFormer, which takes positions from the
    cache's length, fails here). A few forward passes over at most 12 tokens.
    """
    if any(p.is_meta for p in model.base.parameters()):
        return
    vocab = model.base.get_input_embeddings().num_embeddings
    words = torch.arange(3, 11, device=model.device)[None] % vocab  # (1, 8)
    inputs = torch.arange(11, 15, device=model.device)[None] % vocab  # (1, 4)
    name = model.geometry.model_type
    parts = [("check8", words), ("check2", words[:, :2])]
    try:
        for part, ids in parts:
            prefix = Prefix(PrefixConfig(num_virtual_tokens=ids.shape[1], reparameterize=False), model.geometry)
            prefix.parts["decoder"].fit(model._activations(ids, "kv")["decoder"].float())
            model.put_prefix(part, prefix.to(model.dtype))
        got = model(inputs, prefix="check8").logits.float()
        want = model.base(input_ids=torch.cat([words, inputs], dim=1)).logits[:, words.shape[1] :].float()
        if model.layout.recurrent:  # recurrent layers do not see the prefix: no prompt identity to check
            want = got
        _close(
            got,
            want,
            f"unsupported model {name!r}: a prompt's keys and values, given as a prefix, do not "
            "reproduce the prompt (the model computes attention in a way a prefix cannot enter)",
            model.dtype,
        )
        alone = {"check8": got, "check2": model(inputs, prefix="check2").logits.float()}
        equal = _row_error(model, inputs, ["check2", "check2"], alone)
        if equal > _row_tolerance(model.dtype):
            raise PrefixTuneError(
                f"unsupported model {name!r}: a batch over padded inputs differs from each row alone "
                "(the model does not honour the attention mask or positions)"
            )
        # Mixing prefix lengths must be as exact as not mixing them: a model that takes positions from the
        # cache's length shifts rows with shorter prefixes, which tiny random models show only faintly.
        if _row_error(model, inputs, ["check8", "check2"], alone) > max(20 * equal, _row_tolerance(model.dtype)):
            raise PrefixTuneError(
                f"unsupported model {name!r}: a batch mixing prefix lengths differs from each row alone "
                "(the model does not take positions per row)"
            )
    finally:
        for part, _ in parts:
            if model.has_prefix(part):
                model.remove_prefix(part)


def _row_error(model, inputs: torch.Tensor, names: list[str], alone: dict[str, torch.Tensor]) -> float:
    """How far a batch of two rows with prefixes ``names`` over padded ``inputs`` (1, 4) is from each row's
    ``alone`` logits, relative to the logits' scale."""
    ids = torch.cat([inputs, torch.zeros_like(inputs[:, :2])], dim=1).repeat(2, 1)  # (2, 6), right-padded
    ids[1] = torch.roll(ids[1], 2)
    mask = (torch.arange(6, device=model.device) < 4).long().repeat(2, 1)
    mask[1] = torch.roll(mask[1], 2)
    mixed = model(ids, mask, prefix=names).logits.float()
    if not torch.isfinite(mixed).all():
        return float("inf")
    first, second = alone[names[0]], alone[names[1]]
    error = max((mixed[1, 2:] - second[0]).abs().max(), (mixed[0, :4] - first[0]).abs().max())
    return float(error / second.abs().max().clamp(min=1e-3))
