"""The lean step of Llama-family models (prompts and one-token steps): the same logits and tokens as
transformers' forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from families import tiny_base, tiny_config
from tiny import TinyTokenizer, tiny_model
from transformers import AutoModelForCausalLM

from prefixtune import PrefixConfig, PrefixTunedModel, lean
from prefixtune.errors import PrefixTuneError
from prefixtune.state import PrefixedState

TOK = TinyTokenizer()
FAMILIES = ("llama", "mistral", "qwen2")


def _base(family: str, dtype=torch.float32):
    if family == "llama":
        base = tiny_model("llama")
    else:  # full attention everywhere (the shrunk Mistral config has a 4-token window)
        config = tiny_config(family)
        config.sliding_window, config.use_sliding_window = None, False
        config.layer_types = ["full_attention"] * config.num_hidden_layers
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config)
    if family == "qwen2":  # q/k/v biases: make them matter
        with torch.no_grad():
            for layer in base.model.layers:
                for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    m.bias.normal_(0, 0.5)
    return base.to(dtype).eval()


def _model(family: str, dtype=torch.float32, device="cpu") -> PrefixTunedModel:
    base = _base(family, dtype).to(device)
    model = PrefixTunedModel.wrap(base, PrefixConfig(num_virtual_tokens=3, init_std=0.5), TOK, name="a")
    model.add_prefix("b", PrefixConfig(num_virtual_tokens=6, init_std=0.5))
    return model.eval()


def _inputs(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the step's key mask is not all ones
    mask[2, :1] = 0
    return ids, mask


def _steps(model, mode: str, ids, mask, prefix, steps: int = 6) -> list[torch.Tensor]:
    """Logits of the prefill and of ``steps`` one-token steps fed the same tokens."""
    model.decode_weights = mode
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        state, logits = PrefixedState.prefill(model, ids, mask, prefix)
        out = [logits]
        for _ in range(steps):
            tokens = torch.randint(3, model.base.config.vocab_size, (len(ids),), generator=g).to(ids.device)
            out.append(state.extend(tokens))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["plain", "packed"])
def test_step_logits_equal_the_transformers_forward(family, mode):
    model = _model(family)
    assert lean.supports(model.base, model.layout)
    ids, mask = _inputs(model.base.config.vocab_size)
    for prefix, rows in ((["a", "b", "a"], slice(None)), ("b", slice(1, 2))):  # padded keys; then none
        ref = _steps(model, "off", ids[rows], mask[rows], prefix if isinstance(prefix, str) else prefix[rows])
        got = _steps(model, mode, ids[rows], mask[rows], prefix if isinstance(prefix, str) else prefix[rows])
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["plain", "packed"])
def test_prompts_fed_in_chunks_equal_the_forward(mode):
    """Prompts go through the step too, whole or in chunks after what the cache holds (the server's prefill)."""
    model = _model("qwen2")
    ids, mask = _inputs(model.base.config.vocab_size)
    prefixes = ["b", "a", "b"]
    out = {}
    for m in ("off", mode):
        model.decode_weights = m
        with torch.inference_mode():
            state = PrefixedState.begin(model, prefixes, len(ids))
            state.feed(ids[:, :4], mask[:, :4])
            out[m] = [state.feed(ids[:, 4:], mask[:, 4:]), state.extend(ids[:, 0])]
    for a, b in zip(out["off"], out[mode]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")
def test_packed_mode_runs_products_of_several_rows_on_the_blocked_copies(monkeypatch):
    model = _model("llama")
    ids, mask = _inputs(model.base.config.vocab_size)
    _steps(model, "packed", ids, mask, "a", steps=0)  # the step is built (each blocked copy tried once on 2 rows)
    rows = []
    blocked = lean._blocked
    monkeypatch.setattr(lean, "_blocked", lambda x, *a: rows.append(x.shape[0]) or blocked(x, *a))
    _steps(model, "packed", ids, mask, "a", steps=2)
    per_pass = 4 * model.base.config.num_hidden_layers  # q/k/v, output, gate/up, down per layer
    # the prompt (3 rows × 7 tokens; the output layer on the last token of each row), then two steps
    assert rows == [21] * per_pass + [3] + [3] * (per_pass + 1) * 2
    rows.clear()
    _steps(model, "packed", ids[:1], mask[:1], "a", steps=2)
    assert rows == [7] * per_pass  # one row: the plain weights
    rows.clear()
    _steps(model, "plain", ids, mask, "a", steps=2)
    assert rows == []  # plain mode: never


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_sampled_and_beam_tokens_are_unchanged(family):
    model = _model(family)
    ids, mask = _inputs(model.base.config.vocab_size)
    runs = {}
    for mode in ("off", "plain", "packed"):
        model.decode_weights = mode
        runs[mode] = [
            model.generate(ids, mask, prefix=["a", "b", "a"], max_new_tokens=8, min_new_tokens=8),
            model.generate(ids, mask, prefix="b", max_new_tokens=8, num_beams=3),
            model.generate(ids, mask, prefix="a", max_new_tokens=8, do_sample=True, top_k=20, seed=3),
        ]
    for mode in ("plain", "packed"):
        for a, b in zip(runs["off"], runs[mode]):
            assert torch.equal(a, b)


def test_bf16_steps_stay_close_to_the_forward():
    model = _model("llama", torch.bfloat16)
    ids, mask = _inputs(model.base.config.vocab_size)
    ref = _steps(model, "off", ids, mask, ["a", "b", "a"])
    for mode in ("plain", "packed"):
        for a, b in zip(ref, _steps(model, mode, ids, mask, ["a", "b", "a"])):
            torch.testing.assert_close(b.float(), a.float(), rtol=0.02, atol=0.03)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_steps_use_the_model_weights_and_equal_the_forward(dtype):
    model = _model("qwen2", dtype, "cuda")
    step = lean.step_for(model)
    assert step is not None and step.mode == "plain" and step.extra_bytes() == 0  # auto: no blocked copies
    ids, mask = (t.cuda() for t in _inputs(model.base.config.vocab_size))
    ref = _steps(model, "off", ids, mask, ["a", "b", "a"])
    got = _steps(model, "auto", ids, mask, ["a", "b", "a"])
    tol = 1e-3 if dtype == torch.float32 else 0.03
    for a, b in zip(ref, got):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol)


def test_decoding_steps_bypass_the_transformers_forward_unless_hooks_watch_it(monkeypatch):
    model = _model("llama")
    ids, mask = _inputs(model.base.config.vocab_size)
    calls, hooked = [], []
    forward = type(model.base).forward
    monkeypatch.setattr(type(model.base), "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    for mode, passes in (("auto", 0), ("off", 5)):
        calls.clear()
        model.decode_weights = mode
        model.generate(ids, mask, prefix="a", max_new_tokens=5, min_new_tokens=5)
        assert len(calls) == passes  # without the lean step: the prompt, then one pass per step
    # a hook anywhere in the model would be bypassed: transformers' forward runs and the hook sees every step
    model.decode_weights = "auto"
    handle = model.base.model.layers[1].mlp.register_forward_hook(lambda *a: hooked.append(1))
    try:
        calls.clear()
        model.generate(ids, mask, prefix="a", max_new_tokens=5, min_new_tokens=5)
    finally:
        handle.remove()
    assert len(calls) == len(hooked) == 5
    # so does a forward replaced on the instance (what a test or a wrapper does to watch or break it)
    calls.clear()
    monkeypatch.setattr(model.base.model.layers[0], "forward", model.base.model.layers[0].forward)
    model.generate(ids, mask, prefix="a", max_new_tokens=5, min_new_tokens=5)
    assert len(calls) == 5


def test_the_step_is_rebuilt_when_weights_change():
    model = _model("llama")
    ids, mask = _inputs(model.base.config.vocab_size)
    model.decode_weights = "packed"
    with torch.inference_mode():
        PrefixedState.prefill(model, ids, mask, "a")[0].extend(ids[:, -1])
    first = lean._STEPS[model]
    with torch.no_grad():  # in place, as load_state_dict writes
        model.base.model.layers[1].mlp.down_proj.weight.mul_(3.0)
        model.base.lm_head.weight.add_(0.1)
    ref, got = _steps(model, "off", ids, mask, "a"), _steps(model, "packed", ids, mask, "a")
    assert lean._STEPS[model] is not first
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_where_the_step_does_not_apply():
    model = _model("llama")
    with torch.no_grad():
        assert lean.step_for(model) is not None
    assert lean.step_for(model) is None  # autograd on: training and scoring passes keep the forward
    with torch.no_grad():
        model.base.train()
        assert lean.step_for(model) is None  # dropout
        model.base.eval()
        model.decode_weights = "off"
        assert lean.step_for(model) is None
        model.decode_weights = "fast"
        with pytest.raises(PrefixTuneError, match="decode_weights must be one of"):
            lean.step_for(model)
    gpt2 = PrefixTunedModel.wrap(tiny_model("gpt2"), PrefixConfig(num_virtual_tokens=2), TOK)
    windowed = PrefixTunedModel.wrap(tiny_base("mistral"), PrefixConfig(num_virtual_tokens=2), TOK)
    assert not lean.supports(gpt2.base, gpt2.layout)
    assert windowed.layout.plain == lean.supports(windowed.base, windowed.layout)


def test_auto_packs_only_where_the_copies_fit(monkeypatch):
    base = _base("llama")
    weights = sum(t.numel() * t.element_size() for t in lean._sources(base))
    plain, packed = lean.LeanStep(base, "plain"), lean.LeanStep(base, "packed")
    assert (plain.mode, packed.mode) == ("plain", "packed")
    assert plain.extra_bytes() == 0
    if torch.backends.mkldnn.is_available():  # blocked copies of every matrix, stacked q/k/v and gate/up
        assert weights < packed.extra_bytes() < 3 * weights
    assert lean.weights_mode(base, "plain") == "plain"
    monkeypatch.setattr(lean, "_physical_memory", lambda: 10**12)
    assert lean.weights_mode(base, "auto") == "packed"
    monkeypatch.setattr(lean, "_physical_memory", lambda: 10**5)
    assert lean.weights_mode(base, "auto") == "plain"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")
def test_packed_products_equal_plain_ones_for_any_row_count():
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 40, generator=g), torch.randn(48, generator=g)
    linear = lean.Linear(weight, bias, pack=True)
    assert linear.packed is not None
    for rows in (1, 2, 5, 64, 100):
        x = torch.randn(rows, 40, generator=g)
        torch.testing.assert_close(linear(x), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_models_copy_and_pickle_after_decoding_and_the_copy_builds_its_own_step():
    import copy
    import io
    import pickle

    model = _model("llama")
    ids, mask = _inputs(model.base.config.vocab_size)
    model.decode_weights = "packed"
    want = model.generate(ids, mask, prefix="a", max_new_tokens=6)
    twin = copy.deepcopy(model)
    pickle.dump(model, io.BytesIO())  # the blocked copies (opaque tensors) stay out of the model
    assert torch.equal(twin.generate(ids, mask, prefix="a", max_new_tokens=6), want)
    assert lean._STEPS[twin] is not lean._STEPS[model] and lean._STEPS[twin].base is twin.base
