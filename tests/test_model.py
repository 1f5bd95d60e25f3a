"""Oracles for the prefixed forward pass on every supported family (issue 2, points 1-6, 8a/8b/8e)."""

import pytest
import torch
from tiny import ALL, DECODER_ONLY, ENCODER_DECODER, TinyTokenizer, tiny_model
from transformers import AutoModelForCausalLM, GPTNeoXConfig, MistralConfig, OPTConfig, Phi3Config, Qwen2Config

from prefixtune import PrefixConfig, PrefixTunedModel, PrefixTuneError
from prefixtune.geometry import read_geometry
from prefixtune.prefix import count_parameters

WORDS = "table-to-text:"
TOK = TinyTokenizer()


def words_ids():
    return torch.tensor([TOK(WORDS)["input_ids"]])


@pytest.mark.parametrize("family", ALL)
def test_geometry_matches_the_models_own_cache(family):
    base = tiny_model(family)
    geometry = read_geometry(base.config)
    x = torch.tensor([[5, 6, 7]])
    if geometry.is_encoder_decoder:
        cache = base(input_ids=x, decoder_input_ids=x, use_cache=True).cache
        caches = {"decoder": cache.self_attention_cache, "cross": cache.cross_attention_cache}
    else:
        caches = {"decoder": base(input_ids=x, use_cache=True).cache}
    for name, cache in caches.items():
        stack = geometry.stack(name)
        assert len(cache.layers) == stack.num_layers
        assert tuple(cache.layers[0].keys.shape) == (1, stack.num_kv_heads, 3, stack.head_dim)
    assert [s.name for s in geometry.stacks] == (
        ["decoder", "encoder", "cross"] if geometry.is_encoder_decoder else ["decoder"]
    )


def test_gqa_prefix_uses_kv_heads():
    geometry = read_geometry(tiny_model("llama").config)
    assert geometry.stack("decoder").token_shape == (2, 2, 2, 8)  # (L, 2, kv_heads=2 of 4, D)


def test_unsupported_model_names_the_missing_field():
    class Config:
        model_type = "mystery"
        hidden_size = 8

    with pytest.raises(PrefixTuneError, match="mystery.*attention heads"):
        read_geometry(Config())


EXTRA = {
    "qwen2": lambda: Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=128,
    ),
    "mistral": lambda: MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=96,
        max_position_embeddings=128,
    ),
    "gpt_neox": lambda: GPTNeoXConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=96,
        max_position_embeddings=128,
    ),
    "opt": lambda: OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=96,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
    ),
    "phi3": lambda: Phi3Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=128,
        pad_token_id=0,
    ),
}


def _words_equal_prompt(base, mode="kv", reparameterize=True):
    model = PrefixTunedModel.wrap(base, PrefixConfig(init_text=WORDS, mode=mode, reparameterize=reparameterize), TOK)
    w = words_ids()
    x = torch.tensor([[5, 9, 17, 33, 4, 60]])
    with torch.no_grad():
        got = model(x).logits
        want = base(torch.cat([w, x], dim=1)).logits[:, w.shape[1] :]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", DECODER_ONLY)
@pytest.mark.parametrize("reparameterize", [True, False])
def test_8a_prefix_from_words_equals_the_prompt(family, reparameterize):
    _words_equal_prompt(tiny_model(family), reparameterize=reparameterize)


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_8a_embedding_mode_from_words_equals_the_prompt(family):
    _words_equal_prompt(tiny_model(family), mode="embedding")


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_other_decoder_families_need_no_special_code(name):
    torch.manual_seed(0)
    _words_equal_prompt(AutoModelForCausalLM.from_config(EXTRA[name]()).eval())


@pytest.mark.parametrize("family", ENCODER_DECODER)
def test_init_text_reproduces_the_frozen_activations_on_every_stack(family):
    base = tiny_model(family)
    model = PrefixTunedModel.wrap(base, PrefixConfig(init_text=WORDS), TOK)
    targets = model._activations(words_ids(), "kv")
    produced = model.get_prefix("default")()
    assert set(produced) == {"decoder", "encoder", "cross"}
    for name, value in produced.items():
        torch.testing.assert_close(value, targets[name], atol=1e-4, rtol=0)


def _batch(rows):
    """Right-pad rows of token ids; returns (ids, mask)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def _two_prefixes(family, lengths=(3, 5), mode="kv"):
    base = tiny_model(family)
    torch.manual_seed(1)
    model = PrefixTunedModel.wrap(base, PrefixConfig(num_virtual_tokens=lengths[0], mode=mode, init_std=0.5), name="A")
    model.add_prefix("B", PrefixConfig(num_virtual_tokens=lengths[1], mode=mode, init_std=0.5, reparameterize=False))
    return model


def _mixed_equals_alone(model, lengths_differ):
    rows = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    names = ["A", "B", "A"]
    ids, mask = _batch(rows)
    labels = torch.where(mask.bool(), ids, -100)
    with torch.no_grad():
        mixed = model(ids, mask, labels=labels, prefix=names)
        for i, (row, name) in enumerate(zip(rows, names)):
            alone = model(torch.tensor([row]), labels=torch.tensor([row]), prefix=name)
            n = alone.logits.shape[1]
            torch.testing.assert_close(mixed.logits[i, :n], alone.logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5", "bart"])
@pytest.mark.parametrize("mode", ["kv", "embedding"])
def test_8b_mixed_batch_with_different_prefix_lengths_equals_each_row_alone(family, mode):
    _mixed_equals_alone(_two_prefixes(family, (3, 5), mode), True)


def test_8b_bart_mixed_batch_of_equal_length_prefixes():
    _mixed_equals_alone(_two_prefixes("bart", (4, 4)), False)


def test_bart_takes_each_rows_decoder_positions_through_the_position_hook():
    """Without the hook, BART's decoder places every row after the batch's longest prefix: the mixed batch
    then differs from each row alone — so the test above checks the hook, and a model lacking it refuses."""
    model = _two_prefixes("bart", (3, 5))
    hook, model.decoder_positions = model.decoder_positions, None
    ids, mask = _batch([[5, 6], [7, 8]])
    with pytest.raises(PrefixTuneError, match="positions per row"):
        model(ids, mask, labels=ids, prefix=["A", "B"])
    model.decoder_positions = hook
    model(ids, mask, labels=ids, prefix=["A", "B"])


def test_mixed_loss_equals_mean_of_rows():
    model = _two_prefixes("llama")
    ids, mask = _batch([[5, 6, 7, 8, 9], [10, 11, 12]])
    labels = torch.where(mask.bool(), ids, -100)
    with torch.no_grad():
        mixed = model(ids, mask, labels=labels, prefix=["A", "B"])
        a = model(ids[:1], labels=labels[:1], prefix="A")
        b = model(ids[1:, :3], labels=labels[1:, :3], prefix="B")
    want = (a.loss * a.num_target_tokens + b.loss * b.num_target_tokens) / (a.num_target_tokens + b.num_target_tokens)
    torch.testing.assert_close(mixed.loss, want)


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("reparameterize", [True, False])
def test_8e_training_step_changes_only_the_prefix(family, reparameterize):
    base = tiny_model(family)
    config = PrefixConfig(num_virtual_tokens=4, reparameterize=reparameterize, mid_dim=16)
    model = PrefixTunedModel.wrap(base, config)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    prefix_before = [p.detach().clone() for p in model.trainable_parameters()]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()
    for name, value in base.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(prefix_before, model.trainable_parameters()))
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert trainable == count_parameters(model.get_prefix("default").config, model.geometry)
    assert not base.training


def test_flat_parameter_count_formula_on_gqa():
    model = PrefixTunedModel.wrap(tiny_model("llama"), PrefixConfig(num_virtual_tokens=5, reparameterize=False))
    # P × L × 2 × kv_heads × head_dim
    assert sum(p.numel() for p in model.trainable_parameters()) == 5 * 2 * 2 * 2 * 8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": -3}, "num_virtual_tokens"),
        ({"mode": "lora"}, "mode"),
        ({"mid_dim": 0}, "mid_dim"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_invalid_config_values(kwargs, match):
    with pytest.raises(PrefixTuneError, match=match):
        PrefixConfig(**kwargs)


def test_init_text_length_mismatch_and_unknown_prefix():
    with pytest.raises(PrefixTuneError, match="leave num_virtual_tokens unset"):
        PrefixTunedModel.wrap(tiny_model("gpt2"), PrefixConfig(init_text=WORDS, num_virtual_tokens=3), TOK)
    model = PrefixTunedModel.wrap(tiny_model("gpt2"), PrefixConfig(num_virtual_tokens=2))
    with pytest.raises(PrefixTuneError, match="unknown prefix 'nope'"):
        model(torch.tensor([[5, 6]]), prefix="nope")


@pytest.mark.parametrize("family", ALL)
def test_loss_only_equals_the_full_loss_and_gradients(family):
    model = _two_prefixes(family, (4, 4) if family == "bart" else (3, 5))
    ids, mask = _batch([[5, 6, 7, 8, 9], [10, 11, 12]])
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :2] = -100  # a masked source
    model.train()
    full = model(ids, mask, labels=labels, prefix=["A", "B"])
    full.loss.backward()
    grads = [p.grad.clone() for p in model.trainable_parameters()]
    model.zero_grad()
    fast = model(ids, mask, labels=labels, prefix=["A", "B"], loss_only=True)
    fast.loss.backward()
    torch.testing.assert_close(fast.loss, full.loss)
    assert fast.num_target_tokens == full.num_target_tokens
    for a, p in zip(grads, model.trainable_parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-6, rtol=1e-5)
    if family in DECODER_ONLY:
        assert fast.logits.shape[0] == full.num_target_tokens  # the LM head ran on target positions only


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_keeps_the_prefix_and_the_gradients(family):
    def grads(checkpointing):
        torch.manual_seed(0)
        model = PrefixTunedModel.wrap(tiny_model(family), PrefixConfig(num_virtual_tokens=4, mid_dim=16, init_std=0.5))
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        ids, mask = _batch([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
        labels = torch.where(mask.bool(), ids, -100)
        calls = []
        hook = (
            model.base.get_decoder().layers[0].register_forward_hook(lambda *a: calls.append(1))
            if family == "llama"
            else model.base.transformer.h[0].register_forward_hook(lambda *a: calls.append(1))
        )
        out = model(ids, mask, labels=labels, loss_only=True)
        out.loss.backward()
        hook.remove()
        return out.loss.detach(), [p.grad.clone() for p in model.trainable_parameters()], len(calls)

    loss_a, grads_a, calls_a = grads(False)
    loss_b, grads_b, calls_b = grads(True)
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (calls_a, calls_b) == (1, 1)  # forward hooks stay outside the checkpoint: one call each


def test_gradient_checkpointing_recomputes_layers_in_backward():
    torch.manual_seed(0)
    model = PrefixTunedModel.wrap(tiny_model("llama"), PrefixConfig(num_virtual_tokens=4, mid_dim=16))
    model.gradient_checkpointing_enable()
    model.train()
    calls = []
    handle = model.base.get_decoder().layers[1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[5, 6, 7, 8]])
    model(ids, labels=ids, loss_only=True).loss.backward()
    handle.remove()
    assert len(calls) == 2  # the MLP ran in the forward pass and again when backward recomputed the layer
    with pytest.raises(PrefixTuneError, match="decoder-only"):
        PrefixTunedModel.wrap(tiny_model("t5"), PrefixConfig(num_virtual_tokens=2)).gradient_checkpointing_enable()


def test_projected_prefix_is_cached_for_inference_and_refreshed_after_updates():
    torch.manual_seed(0)
    model = PrefixTunedModel.wrap(tiny_model("llama"), PrefixConfig(num_virtual_tokens=3, mid_dim=16))
    prefix = model.get_prefix("default")
    calls = []
    prefix.parts["decoder"].mlp.register_forward_hook(lambda *a: calls.append(1))
    model.eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        first = model(ids).logits
        again = model(ids).logits
    assert len(calls) == 1 and torch.equal(first, again)  # the MLP ran once for two passes
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    model.train()
    model(ids, labels=ids).loss.backward()  # training passes always recompute (with gradients)
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(after, first)  # the update is seen
    with torch.no_grad():
        expected = prefix.parts["decoder"]()
    torch.testing.assert_close(prefix()["decoder"], expected, atol=0, rtol=0)


def test_the_set_of_prefixes_has_a_small_public_api():
    """add, put (replace), get, has, names, remove, resident bytes; the first added is active."""
    torch.manual_seed(0)
    model = PrefixTunedModel.wrap(tiny_model("llama"), PrefixConfig(num_virtual_tokens=3, mid_dim=16), name="a")
    b = model.add_prefix("b", PrefixConfig(num_virtual_tokens=5, reparameterize=False))
    assert model.prefix_names() == ["a", "b"] and model.active == "a"
    assert model.get_prefix() is model.get_prefix("a") and model.get_prefix("b") is b
    assert model.has_prefix("b") and not model.has_prefix("c")
    g = model.geometry.stack("decoder")
    flat_b = 5 * g.num_layers * 2 * g.num_kv_heads * g.head_dim * 4  # fp32 keys and values
    assert model.resident_bytes("b") == flat_b
    with_mlp = model.resident_bytes("a")
    assert with_mlp > 3 * g.num_layers * 2 * g.num_kv_heads * g.head_dim * 4  # the MLP is held too
    assert model.resident_bytes() == with_mlp + flat_b
    model.eject_mlp("a")
    assert model.resident_bytes("a") == 3 * g.num_layers * 2 * g.num_kv_heads * g.head_dim * 4
    replacement = model.add_prefix("b", PrefixConfig(num_virtual_tokens=2, reparameterize=False))
    assert model.get_prefix("b") is replacement and model.prefix_names() == ["a", "b"]
    model.remove_prefix("a")
    assert model.prefix_names() == ["b"] and model.active == "b"
    with pytest.raises(PrefixTuneError, match=r"unknown prefix 'a' \(loaded: b\)"):
        model.get_prefix("a")
    with pytest.raises(PrefixTuneError, match="invalid prefix name"):
        model.put_prefix("x\n", replacement)
    with pytest.warns(DeprecationWarning, match="eject_mlp"):
        model.export("b")


def test_nothing_outside_the_model_touches_its_prefix_dict():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for folder in ("prefixtune", "benchmarks")
        for path in (root / folder).rglob("*.py")
        if path.name != "model.py" or path.parent.name != "prefixtune"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "._prefixes" in line or ".prefixes[" in line
    ]
    assert not offenders
