"""The in-place growing cache layer: the same history as transformers' concatenating layer, without
copying it at every step."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model
from transformers.cache_utils import DynamicLayer

from prefixtune import PrefixConfig, PrefixTunedModel
from prefixtune.kvcache import GrowingLayer


def _steps(rows=3, heads=2, dim=4, lengths=(0, 5, 1, 0, 1, 7, 1, 40, 1, 1)):
    g = torch.Generator().manual_seed(0)
    shape = (rows, heads)
    return [(torch.randn(*shape, n, dim, generator=g), torch.randn(*shape, n, dim + 2, generator=g)) for n in lengths]


def _replay(layer, steps, reorder_at=None, index=None):
    outs = []
    for i, (k, v) in enumerate(steps):
        if i == reorder_at:
            layer.reorder_cache(index)
        outs.append(tuple(t.clone() for t in layer.update(k, v)))
    return outs


def test_updates_return_what_the_concatenating_layer_returns_across_growth_and_reordering():
    steps = _steps()
    index = torch.tensor([2, 0, 0])
    for reorder_at in (None, 3, 6):
        grown, plain = GrowingLayer(), DynamicLayer()
        for a, b in zip(_replay(grown, steps, reorder_at, index), _replay(plain, steps, reorder_at, index)):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(grown.keys, plain.keys) and torch.equal(grown.values, plain.values)
        assert grown.get_seq_length() == plain.get_seq_length() == sum(k.shape[2] for k, _ in steps)


def test_single_steps_write_in_place_and_reallocate_rarely():
    layer = GrowingLayer()
    steps = _steps(lengths=(10,) + (1,) * 200)
    buffers = set()
    for k, v in steps:
        layer.update(k, v)
        buffers.add(layer.keys.untyped_storage().data_ptr())
    # concatenation would make 201 buffers; growing by a quarter (at least 32) needs a handful
    assert len(buffers) <= 8


def test_assigned_tensors_are_never_written_into():
    layer = GrowingLayer()
    outside = torch.randn(2, 2, 6, 4)
    before = outside.clone()
    layer.keys, layer.values = outside, outside.clone()
    layer.is_initialized = True
    layer.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    assert torch.equal(outside, before)
    # trimming leading slots assigns a view of the layer's own buffer: appends after it keep the content
    layer.keys, layer.values = layer.keys[:, :, 2:], layer.values[:, :, 2:]
    keys, _ = layer.update(torch.zeros(2, 2, 1, 4), torch.zeros(2, 2, 1, 4))
    assert torch.equal(keys[:, :, :4], before[:, :, 2:]) and keys.shape[2] == 6


def test_a_cache_filled_under_inference_mode_continues_outside_it():
    steps = _steps()
    grown, plain = GrowingLayer(), DynamicLayer()
    with torch.inference_mode():
        _replay(grown, steps[:3])
        _replay(plain, steps[:3])
    with torch.no_grad():
        for a, b in zip(_replay(grown, steps[3:]), _replay(plain, steps[3:])):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gradients_flow_through_updates_that_need_them():
    layer = GrowingLayer()
    prefix = torch.randn(1, 2, 3, 4, requires_grad=True)
    layer.update(prefix, prefix * 2)
    keys, values = layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    keys2, values2 = layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    (keys.sum() + values.sum() + keys2.sum() + values2.sum()).backward()
    assert torch.equal(prefix.grad, torch.full_like(prefix, 6.0))


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_decoding_with_the_growing_layer_equals_decoding_with_the_concatenating_one(family, monkeypatch):
    import prefixtune.state as state

    torch.manual_seed(3)
    model = PrefixTunedModel.wrap(tiny_model(family), PrefixConfig(num_virtual_tokens=3, init_std=0.5))
    ids = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = (ids != 0).long()
    outputs = []
    for layer in (GrowingLayer, DynamicLayer):
        monkeypatch.setattr(state, "GrowingLayer", layer)
        for beams in (1, 3):
            outputs.append(model.generate(ids, mask, max_new_tokens=40, min_new_tokens=40, num_beams=beams))
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[3])
