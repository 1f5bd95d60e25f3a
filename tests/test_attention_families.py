"""Every attention family transformers ships, through the public API (issue 15, point 4).

Sliding-window layers (Gemma 2/3, Mistral, Cohere 2, gpt-oss, OLMo 3, EXAONE 4, Qwen 2 with windows),
chunked attention (Llama 4), multi-head latent attention (DeepSeek-V2/V3, whose cache holds latents of
different widths for "keys" and "values"). Windows are 4 tokens, so prefixes (3 to 14 tokens) and
inputs cross them. Oracles: a prefix from real words ≡ the discrete prompt; a mixed batch (prefixes
of different lengths, padded inputs) ≡ each row alone; greedy and beam decoding ≡ Hugging Face
``generate`` on the prompt; a row joining a running batch ≡ alone; only the prefix trains.
"""

import pytest
import torch
from tiny import TinyTokenizer
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from prefixtune import GenerationOptions, PrefixConfig, PrefixTunedModel, PrefixTuneError
from prefixtune.interop import export_peft
from prefixtune.state import PrefixedState

TOK = TinyTokenizer()
WORDS = "a longer prompt"  # 15 tokens: far beyond the 4-token windows
SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=96,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MLA = dict(
    q_lora_rank=16,
    kv_lora_rank=8,
    qk_rope_head_dim=4,
    head_dim=4,  # the rotary width, as DeepSeek configs set it
    qk_nope_head_dim=8,
    v_head_dim=8,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    num_key_value_heads=4,
)
FAMILIES = {
    "gemma2": dict(sliding_window=4),
    "gemma3_text": dict(sliding_window=4),
    "mistral": dict(sliding_window=4),
    "cohere2": dict(sliding_window=4),
    "gpt_oss": dict(sliding_window=4, num_local_experts=4, num_experts_per_tok=2),
    "olmo3": dict(sliding_window=4),
    "exaone4": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
    "llama4_text": dict(
        attention_chunk_size=4,
        num_local_experts=2,
        num_experts_per_tok=1,
        intermediate_size_mlp=64,
        no_rope_layers=[1, 1, 1, 1],
        interleave_moe_layer_step=1,
    ),
    "deepseek_v2": MLA,
    "deepseek_v3": MLA,
    # layers that differ: Gemma 4's global layer has wider heads; MiMo-V2-Flash's sliding layers more heads
    "gemma4_text": dict(sliding_window=4, per_layer_config={"03": {"head_dim": 16}}, hidden_size_per_layer_input=0),
    "mimo_v2_flash": dict(sliding_window=4, v_head_dim=12),
    # KV sharing (Gemma 3n/4): the last 2 layers attend to earlier layers' keys and values, prefix included
    "gemma4_text/kv_sharing": dict(
        num_hidden_layers=6,
        layer_types=["sliding_attention", "full_attention"] * 3,
        sliding_window=4,
        num_kv_shared_layers=2,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=96,
    ),
}


def _base(family):
    torch.manual_seed(0)
    config = CONFIG_MAPPING[family.split("/")[0]](**{**SMALL, **FAMILIES[family]})
    return AutoModelForCausalLM.from_config(config).eval()


def _words():
    return torch.tensor([TOK(WORDS, add_special_tokens=False)["input_ids"]])


def _two_prefixes(family):
    model = PrefixTunedModel.wrap(_base(family), PrefixConfig(init_text=WORDS, reparameterize=False), TOK, name="A")
    torch.manual_seed(1)
    model.add_prefix("B", PrefixConfig(num_virtual_tokens=3, init_std=0.5, reparameterize=False))
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefix_from_words_equals_the_prompt(family):
    base = _base(family)
    model = PrefixTunedModel.wrap(base, PrefixConfig(init_text=WORDS), TOK)
    x = torch.tensor([[5, 9, 17, 33, 4, 60, 7, 8]])
    with torch.no_grad():
        got = model(x).logits
        want = base(torch.cat([_words(), x], dim=1)).logits[:, _words().shape[1] :]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mixed_batch_of_prefix_lengths_and_padded_inputs_equals_each_row_alone(family):
    model = _two_prefixes(family)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
    names = ["A", "B", "B"]
    width = max(map(len, rows))
    for left in (True, False):
        pad = [[0] * (width - len(r)) for r in rows]
        ids = torch.tensor([p + r if left else r + p for p, r in zip(pad, rows)])
        mask = torch.tensor(
            [[0] * len(p) + [1] * len(r) if left else [1] * len(r) + [0] * len(p) for p, r in zip(pad, rows)]
        )
        with torch.no_grad():
            mixed = model(ids, mask, prefix=names).logits
            for i, (row, name) in enumerate(zip(rows, names)):
                alone = model(torch.tensor([row]), prefix=name).logits[0]
                got = mixed[i][mask[i].bool()]
                torch.testing.assert_close(got, alone, atol=1e-5, rtol=0, msg=f"{family} row {i} left={left}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("num_beams", [1, 3])
def test_decoding_with_a_word_prefix_equals_hf_generate_on_the_prompt(family, num_beams):
    base = _base(family)
    model = PrefixTunedModel.wrap(base, PrefixConfig(init_text=WORDS, reparameterize=False), TOK)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    options = dict(max_new_tokens=10, num_beams=num_beams, eos_token_id=2, pad_token_id=0)
    got = model.generate(ids, **options)
    want = base.generate(torch.cat([_words(), ids], dim=1), do_sample=False, **options)
    assert got[0, ids.shape[1] :].tolist() == want[0, _words().shape[1] + ids.shape[1] :].tolist()


@pytest.mark.parametrize("family", ["gemma2", "llama4_text", "deepseek_v3"])
def test_a_row_joining_a_running_batch_decodes_as_alone(family):
    """Continuous batching: B is prefilled after A has decoded 5 tokens, then both decode together."""
    model = _two_prefixes(family)

    def greedy(state, logits, steps):
        out = []
        for _ in range(steps):
            token = logits.argmax(-1)
            out.append(token)
            logits = state.extend(token)
        return torch.stack(out, dim=1), logits

    with torch.no_grad():
        a, a_logits = PrefixedState.prefill(model, torch.tensor([[5, 6, 7]]), torch.ones(1, 3), "A")
        a_first, a_logits = greedy(a, a_logits, 5)
        b, b_logits = PrefixedState.prefill(model, torch.tensor([[8, 9, 10, 11, 12, 13]]), torch.ones(1, 6), "B")
        both = PrefixedState.merge([a, b])
        together, _ = greedy(both, torch.cat([a_logits, b_logits]), 6)
        alone_a, _ = greedy(*PrefixedState.prefill(model, torch.tensor([[5, 6, 7]]), torch.ones(1, 3), "A"), 11)
        alone_b, _ = greedy(
            *PrefixedState.prefill(model, torch.tensor([[8, 9, 10, 11, 12, 13]]), torch.ones(1, 6), "B"), 6
        )
    assert torch.cat([a_first, together[:1]], dim=1).tolist() == alone_a.tolist()
    assert together[1:].tolist() == alone_b.tolist()


@pytest.mark.parametrize("family", ["gemma3_text", "deepseek_v3"])
def test_training_changes_only_the_prefix(family):
    model = PrefixTunedModel.wrap(_base(family), PrefixConfig(num_virtual_tokens=6), TOK)
    frozen = {n: p.clone() for n, p in model.base.named_parameters()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    model.train()
    before = model(ids, labels=ids).loss.item()
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert model(ids, labels=ids).loss.item() < before
    assert all(torch.equal(p, frozen[n]) for n, p in model.base.named_parameters())


def test_latent_attention_prefix_holds_the_cached_latents():
    model = PrefixTunedModel.wrap(_base("deepseek_v3"), PrefixConfig(num_virtual_tokens=2, reparameterize=False))
    stack = model.geometry.stack("decoder")
    # Per layer: one latent "head" of kv_lora_rank=8 and the rotary key of qk_rope_head_dim=4.
    assert stack.token_shape == (4, 1, 8 + 4)
    assert model.get_prefix().parts["decoder"].flat.shape == (2, 4, 1, 12)


@pytest.mark.parametrize(
    "family, layers",
    [("gemma4_text", [(2, 8, 8)] * 3 + [(2, 16, 16)]), ("mimo_v2_flash", [(2, 8, 12)] + [(4, 8, 12)] * 3)],
)
def test_layers_of_different_shapes_each_get_their_own_prefix(family, layers, tmp_path):
    model = _two_prefixes(family)
    stack = model.geometry.stack("decoder")
    assert stack.layer_shapes() == layers
    rows = model.get_prefix("A").parts["decoder"].flat
    assert rows.shape == (len(_words()[0]), sum(h * (k + v) for h, k, v in layers))
    for (keys, values), (h, k, v) in zip(stack.split(rows[None]), layers):
        assert keys.shape[1:] == (h, rows.shape[0], k) and values.shape[1:] == (h, rows.shape[0], v)
    assert torch.equal(stack.join([(k[0], v[0]) for k, v in stack.split(rows[None])]), rows)
    model.save_prefix(tmp_path / "A", "A")
    again = PrefixTunedModel.wrap(_base(family), PrefixConfig(num_virtual_tokens=1), TOK, name="X")
    again.load_prefix(tmp_path / "A", name="A")
    assert torch.equal(again.get_prefix("A").parts["decoder"].flat, rows)
    with pytest.raises(PrefixTuneError, match="no PEFT equivalent"):
        export_peft(tmp_path / "A", tmp_path / "peft")


def test_kv_sharing_layers_take_no_prefix_of_their_own():
    model = _two_prefixes("gemma4_text/kv_sharing")
    assert model.layout.num_layers == 6 and model.layout.attention_indices == (0, 1, 2, 3)
    assert model.geometry.stack("decoder").num_layers == 4


def _hybrid():
    config = CONFIG_MAPPING["qwen3_next"](**{**SMALL, "layer_types": ["linear_attention", "full_attention"] * 2})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_hybrid_models_take_the_prefix_on_their_attention_layers_and_say_so():
    with pytest.warns(UserWarning, match="2 attention layers only.*2 recurrent layers"):
        model = PrefixTunedModel.wrap(_hybrid(), PrefixConfig(num_virtual_tokens=4, init_std=0.5), TOK, name="A")
    assert model.geometry.stack("decoder").num_layers == 2  # of 4 layers
    torch.manual_seed(1)
    model.add_prefix("B", PrefixConfig(num_virtual_tokens=2, init_std=0.5, reparameterize=False))
    rows, names = [[5, 6, 7, 8, 9], [10, 11]], ["A", "B"]
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 0, 10, 11]])
    mask = (ids != 0).long()
    batched = model.generate(ids, mask, prefix=names, max_new_tokens=6, eos_token_id=[])
    for i, (row, name) in enumerate(zip(rows, names)):
        alone = model.generate(torch.tensor([row]), prefix=name, max_new_tokens=6, eos_token_id=[])
        assert batched[i, 5:].tolist() == alone[0, len(row) :].tolist()


def test_layers_of_unknown_kinds_are_refused_with_the_reason():
    config = CONFIG_MAPPING["falcon_h1"](**{**SMALL, "num_hidden_layers": 4})  # attention and Mamba in one layer
    base = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(PrefixTuneError, match="layers include .*every layer must be attention"):
        PrefixTunedModel.wrap(base, PrefixConfig(num_virtual_tokens=2))


def test_only_the_state_module_touches_transformers_caches():
    """Issue 15, point 1: one object owns the prefixed decoding state; no other module reaches into caches
    (kvcache.py is the cache layer the state is built of; layout.py reads the layer types from the config)."""
    import re
    from pathlib import Path

    import prefixtune

    pattern = re.compile(
        r"DynamicCache|EncoderDecoderCache|is_updated|reorder_cache|cache\.layers|layer\.keys|cache_utils"
    )
    root = Path(prefixtune.__file__).parent
    offenders = [
        f"{path.relative_to(root)}:{i}"
        for path in root.rglob("*.py")
        if path.name not in ("state.py", "kvcache.py", "layout.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.lstrip().startswith(("#", "*"))
    ]
    assert offenders == []


def test_the_server_engine_decodes_hybrid_models_in_static_batches_equal_to_alone():
    from prefixtune.serving.engine import Engine, Request

    with pytest.warns(UserWarning):
        model = PrefixTunedModel.wrap(_hybrid(), PrefixConfig(num_virtual_tokens=4, init_std=0.5), TOK, name="A")
    engine = Engine(model, eos_token_ids=[], pad_token_id=0)
    assert not engine.continuous  # recurrent states do not merge
    done = {}
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    with torch.inference_mode():
        for i, ids in enumerate(prompts):
            options = GenerationOptions(max_new_tokens=5)
            engine.submit(Request("A", ids, options, on_done=lambda r, t, i=i: done.__setitem__(i, t)))
        while engine.busy:
            engine.step()
    for i, ids in enumerate(prompts):
        alone = model.generate(torch.tensor([ids]), prefix="A", max_new_tokens=5, eos_token_id=[])
        assert done[i] == alone[0, len(ids) :].tolist()
