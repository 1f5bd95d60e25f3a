"""``torch.compile`` for training: each layer of the frozen base compiled in place.

Whole-model compilation breaks on the model-level glue (mask building, cache objects) and would
change the module tree. Compiling each transformer layer (``nn.Module.compile``) keeps the
parameter names, the prefix cache and every caller unchanged; inductor fuses the layer's norms,
rotary embedding, activation and attention glue, forward and backward. Shapes are marked dynamic so
batches of new lengths reuse the compiled code.
"""

from __future__ import annotations

import torch

from .errors import PrefixTuneError


def transformer_layers(model) -> list[torch.nn.Module]:
    """The base's transformer blocks (encoder and decoder), as transformers marks them."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # every transformers block

    return [m for m in model.base.modules() if isinstance(m, GradientCheckpointingLayer)]


def compile_layers(model) -> int:
    """Compile every transformer layer of ``model.base`` in place; returns how many.

    The first steps pay a one-off compilation (about 80 s for the 30-layer default model on 2 CPU cores). Each layer
    is its own specialization (its layer index is a constant), so dynamo's recompile limit is
    raised to cover them all.
    """
    layers = transformer_layers(model)
    if not layers:
        raise PrefixTuneError(f"--compile: found no transformer layers in {type(model.base).__name__}")
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 4 * len(layers) + 8))  # static, dynamic, train, eval
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 16 * len(layers))
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def uncompile_layers(model) -> None:
    """Back to eager layers (after training: decoding with growing caches would recompile)."""
    for layer in transformer_layers(model):
        layer._compiled_call_impl = None  # what nn.Module.compile set
