"""Decoding oracles (issue 2, points 7 and 8c): cached decoding equals recomputation, beams equal HF."""

import pytest
import torch
from tiny import ALL, DECODER_ONLY, TinyTokenizer, tiny_model

from prefixtune import GenerationOptions, PrefixConfig, PrefixTunedModel, PrefixTuneError

TOK = TinyTokenizer()


def _model(family, **kw):
    torch.manual_seed(3)
    return PrefixTunedModel.wrap(tiny_model(family), PrefixConfig(num_virtual_tokens=3, init_std=0.5, **kw))


def _manual_greedy(model, ids, steps, prefix=None):
    """Greedy decoding by full forward passes, no cache."""
    enc_dec = model.geometry.is_encoder_decoder
    out = torch.tensor([[model.base.config.decoder_start_token_id]]) if enc_dec else ids
    for _ in range(steps):
        with torch.no_grad():
            if enc_dec:
                logits = model(ids, decoder_input_ids=out, prefix=prefix).logits
            else:
                logits = model(out, prefix=prefix).logits
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("family", ALL)
def test_8c_cached_greedy_equals_full_recomputation(family):
    model = _model(family)
    ids = torch.tensor([[5, 6, 7, 8]])
    got = model.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(got, _manual_greedy(model, ids, 8))
    assert torch.equal(model.generate(ids, max_new_tokens=8, eos_token_id=[], num_beams=1), got)


@pytest.mark.parametrize("family", DECODER_ONLY)
@pytest.mark.parametrize("num_beams, length_penalty", [(3, 1.0), (5, 0.8), (4, 2.0)])
def test_beam_search_with_word_prefix_equals_hf_generate_on_the_prompt(family, num_beams, length_penalty):
    base = tiny_model(family)
    model = PrefixTunedModel.wrap(base, PrefixConfig(init_text="table-to-text:", reparameterize=False), TOK)
    w = torch.tensor([TOK("table-to-text:")["input_ids"]])
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    kwargs = dict(max_new_tokens=12, num_beams=num_beams, length_penalty=length_penalty, eos_token_id=2, pad_token_id=0)
    got = model.generate(ids, **kwargs)
    want = base.generate(torch.cat([w, ids], 1), do_sample=False, **kwargs)
    assert torch.equal(got[:, ids.shape[1] :], want[:, w.shape[1] + ids.shape[1] :])


@pytest.mark.parametrize("family", ALL)
def test_batched_left_padded_generation_equals_each_row_alone(family):
    model = _model(family)
    model.add_prefix("B", PrefixConfig(num_virtual_tokens=3 if family == "bart" else 5, init_std=0.5))
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    names = ["default", "B", "default"]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    for beams in (1, 3):
        batched = model.generate(ids, mask, prefix=names, max_new_tokens=6, num_beams=beams)
        for i, (row, name) in enumerate(zip(rows, names)):
            alone = model.generate(torch.tensor([row]), prefix=name, max_new_tokens=6, num_beams=beams)
            new_alone = alone[0, (0 if model.geometry.is_encoder_decoder else len(row)) :]
            new_batched = batched[i, (0 if model.geometry.is_encoder_decoder else width) :][: len(new_alone)]
            assert torch.equal(new_batched, new_alone), (family, beams, i)


def test_eos_min_new_tokens_and_padding():
    model = _model("llama")
    ids = torch.tensor([[5, 6, 7]])
    first = model.generate(ids, max_new_tokens=1)[0, -1].item()
    # Declaring the greedy first token as EOS ends the row at once ...
    assert model.generate(ids, max_new_tokens=5, eos_token_id=first).shape[1] == 4
    # ... unless min_new_tokens forbids it.
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=3, eos_token_id=first)
    assert out.shape[1] >= 3 + 3 and first not in out[0, 3:5].tolist()


def test_no_repeat_ngram_size():
    model = _model("gpt2")
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=20, no_repeat_ngram_size=2, eos_token_id=[])
    seq = out[0].tolist()
    bigrams = list(zip(seq, seq[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_sampling_is_seeded_and_varies():
    model = _model("llama")
    ids = torch.tensor([[5, 6, 7]])
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    a = model.generate(ids, do_sample=True, max_new_tokens=10, generator=g(0), eos_token_id=[], temperature=2.0)
    b = model.generate(ids, do_sample=True, max_new_tokens=10, generator=g(0), eos_token_id=[], temperature=2.0)
    c = model.generate(ids, do_sample=True, max_new_tokens=10, generator=g(1), eos_token_id=[], temperature=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_generation_options():
    model = _model("gpt2")
    with pytest.raises(PrefixTuneError, match="num_beams"):
        model.generate(torch.tensor([[5]]), num_beams=0)
    with pytest.raises(PrefixTuneError, match="unknown generation option"):
        model.generate(torch.tensor([[5]]), beams=3)


def _rows_per_step(model):
    """Record the batch size of every forward call of the base model."""
    sizes = []
    key = "decoder_input_ids"

    def hook(_module, args, kwargs):
        ids = kwargs.get(key) if kwargs.get(key) is not None else kwargs.get("input_ids")
        sizes.append(len(ids))

    return sizes, model.base.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("num_beams", [1, 4])
def test_rows_leave_the_batch_when_done_and_results_equal_hf_generate(num_beams):
    """Finished rows stop being computed; the outputs stay those of HF generate on the word prefix."""
    base = tiny_model("llama")  # the tiny GPT-2 repeats one token per row; Llama's rows vary
    model = PrefixTunedModel.wrap(base, PrefixConfig(init_text="table-to-text:", reparameterize=False), TOK)
    w = torch.tensor([TOK("table-to-text:")["input_ids"]])
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [17, 18, 19, 20], [21, 22, 23, 24]])
    eos = _staggered_eos(model, ids, rows=range(len(ids)))
    kwargs = dict(max_new_tokens=12, num_beams=num_beams, eos_token_id=eos, pad_token_id=0, length_penalty=0.0)
    sizes, handle = _rows_per_step(model)
    got = model.generate(ids, **kwargs)
    handle.remove()
    want = base.generate(torch.cat([w.expand(len(ids), -1), ids], 1), do_sample=False, **kwargs)
    got, want = got[:, ids.shape[1] :], want[:, w.shape[1] + ids.shape[1] :]
    ended = torch.isin(want, torch.tensor(eos)).long().cumsum(1).roll(1, 1)  # after each row's first end token
    ended[:, 0] = 0
    assert torch.equal(got.masked_fill(ended > 0, 0), want.masked_fill(ended > 0, 0))  # HF pads after EOS its own way
    assert sizes[0] == len(ids) and sizes[-1] < len(ids) * num_beams  # rows really left


def _staggered_eos(model, ids, mask=None, prefix=None, rows=(1, 3)):
    """End tokens from a greedy run: row i's token 2i + 2 for each of ``rows``, so that rows end at different steps."""
    out = model.generate(ids, mask, prefix=prefix, max_new_tokens=12, eos_token_id=[])
    start = 1 if model.geometry.is_encoder_decoder else ids.shape[1]
    return sorted({int(out[i, start + 2 * i + 1]) for i in rows})


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])  # the tiny BART ignores its input: all rows alike
def test_pruned_batches_equal_each_row_alone(family):
    model = _model(family)
    torch.manual_seed(5)
    model.add_prefix("B", PrefixConfig(num_virtual_tokens=3, init_std=2.0))
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15, 16, 17, 18]]
    names = ["default", "B", "default", "B"]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    enc_dec = model.geometry.is_encoder_decoder
    eos = _staggered_eos(model, ids, mask, names)
    for beams in (1, 3):
        # length_penalty=0: a beam row is final once K hypotheses ended (random models rarely get there otherwise)
        kwargs = dict(max_new_tokens=10, num_beams=beams, eos_token_id=eos, pad_token_id=0, length_penalty=0.0)
        batched = model.generate(ids, mask, prefix=names, **kwargs)
        lengths = []
        for i, row in enumerate(rows):
            alone = model.generate(torch.tensor([row]), prefix=names[i], **kwargs)[0, (0 if enc_dec else len(row)) :]
            lengths.append(len(alone))
            assert torch.equal(batched[i, (0 if enc_dec else width) :][: len(alone)], alone), (family, beams, i)
        assert len(set(lengths)) > 1, "rows should end at different steps for this test to mean anything"


def _hf_generate_with_prefix_cache(model, ids, **options):
    """Hugging Face ``generate`` on an encoder-decoder model, given the prefix as its cache: the encoder
    states computed with the encoder prefix, the decoder and cross-attention prefixes in the cache
    (one copy per beam), and placeholder decoder tokens standing for the cached prefix positions."""
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    beams = options["num_beams"]
    with torch.no_grad():
        batch = model.batch_prefix(None, len(ids))
        hidden, key_mask = model.encode(ids, torch.ones_like(ids), batch)

        def filled(layers):
            cache = DynamicCache()
            for i, (k, v) in enumerate(layers):
                cache.update(k.repeat_interleave(beams, 0), v.repeat_interleave(beams, 0), i)
            return cache

        cache = EncoderDecoderCache(filled(batch["decoder"].layers), filled(batch["cross"].layers))
        for i in cache.is_updated:
            cache.is_updated[i] = False
        length = batch["decoder"].mask.shape[1]
        start = torch.full((len(ids), length + 1), model.base.config.decoder_start_token_id)
        out = model.base.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=key_mask,
            decoder_input_ids=start,
            decoder_attention_mask=torch.ones_like(start),
            past_key_values=cache,
            do_sample=False,
            **options,
        )
    return out[:, length:]


@pytest.mark.parametrize("family", ["t5", "bart"])
@pytest.mark.parametrize("num_beams, length_penalty", [(3, 1.0), (4, 0.5), (2, 2.0)])
def test_encoder_decoder_beam_search_equals_hf_generate_with_the_prefix_as_its_cache(family, num_beams, length_penalty):
    torch.manual_seed(5)
    model = PrefixTunedModel.wrap(tiny_model(family), PrefixConfig(num_virtual_tokens=4, init_std=1.0))
    ids = torch.tensor([[5, 6, 7, 8, 9], [30, 11, 42, 13, 50]])
    options = dict(
        max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty, eos_token_id=2, pad_token_id=0
    )
    got = model.generate(ids, **options)
    want = _hf_generate_with_prefix_cache(model, ids, **options)
    assert got.tolist() == want[:, : got.shape[1]].tolist()
    assert (want[:, got.shape[1] :] == 0).all()


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_the_output_layer_multiplies_contiguous_rows_when_decoding(family):
    """Asked for the last position only, models hand their output layer a strided view, which a linear layer
    multiplies row by row (10× slower than one matrix product): the wrapper makes its input contiguous, with
    the same logits."""
    model = _model(family)
    seen = []
    head = model.base.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, eos_token_id=2, pad_token_id=0)
    hook.remove()
    assert seen and all(seen)
    assert torch.equal(out, _manual_greedy(model, ids, 3)[:, : out.shape[1]]) or 2 in out


def test_eos_hold_scores_equal_transformers_min_new_tokens_processor():
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    from prefixtune.generation import _HoldEos

    torch.manual_seed(0)
    scores = torch.randn(3, 50)
    for prompt_len, min_new, length in [(4, 3, 5), (4, 3, 7), (4, 3, 8), (2, 0, 2), (1, 10, 30)]:
        ids = torch.zeros(3, length, dtype=torch.long)
        ours = _HoldEos(prompt_len, min_new, [7, 11])(ids, scores)
        theirs = MinNewTokensLengthLogitsProcessor(prompt_len, min_new, [7, 11])(ids, scores)
        assert torch.equal(ours, theirs), (prompt_len, min_new, length)
    assert torch.isfinite(scores).all()  # the input is left as it was


def test_rows_chosen_together_equal_each_row_chosen_alone():
    """choose_rows (the server's per-step choice) gives each row the token its own chooser gives it alone:
    greedy rows (EOS held back or not) in one argmax, the others (penalties, sampling) one by one; a row
    whose scores are NaN gets its own error and the others are unaffected."""
    from prefixtune.generation import TokenChooser, choose_rows, seeded

    torch.manual_seed(1)
    vocab, eos = 40, [3]
    logits = torch.randn(7, vocab)
    logits[:, 3] += 4.0  # EOS the best token, so holding it back changes the answer
    logits[5] = float("nan")
    prompts = [[1, 2], [5, 6, 7], [8], [9, 9], [4, 4, 4], [2], [6, 5]]
    generated = [0, 1, 0, 2, 5, 0, 3]
    opts = [
        GenerationOptions(max_new_tokens=8),
        GenerationOptions(max_new_tokens=8, min_new_tokens=4),
        GenerationOptions(max_new_tokens=8, min_new_tokens=1),
        GenerationOptions(max_new_tokens=8, repetition_penalty=1.3),
        GenerationOptions(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=5, seed=3),
        GenerationOptions(max_new_tokens=8, min_new_tokens=2),
        GenerationOptions(max_new_tokens=8, min_new_tokens=2),
    ]
    history = [p + [10 + j for j in range(n)] for p, n in zip(prompts, generated)]

    def chooser(i):
        return TokenChooser(opts[i], len(prompts[i]), eos, seeded(opts[i].seed, "cpu"))

    choosers = [chooser(i) for i in range(7)]
    assert [c.plain for c in choosers] == [True, True, True, False, False, True, True]
    picks = choose_rows(choosers, generated, logits.clone(), lambda i: torch.tensor([history[i]]))
    for i in range(7):
        if i == 5:
            assert isinstance(picks[i], PrefixTuneError) and "NaN" in str(picks[i])
            continue
        alone = int(chooser(i)(torch.tensor([history[i]]), logits[i : i + 1])[0])
        assert picks[i] == alone, i
    assert picks[0] == 3 and picks[1] != 3 and picks[6] == 3  # held back only below the minimum


def test_nan_rows_finds_a_nan_anywhere_in_a_row():
    from prefixtune.generation import _nan_rows

    scores = torch.randn(6, 50)
    scores[0, 0] = scores[1, -1] = scores[2, 7] = float("nan")
    scores[2, 3] = float("inf")  # NaN beside +inf
    scores[3] = -float("inf")  # all -inf is a number
    scores[4, 10] = float("inf")
    scores[5, :] = float("nan")
    want = [True, True, True, False, False, True]
    assert _nan_rows(scores).tolist() == torch.isnan(scores).any(dim=1).tolist() == want


def test_argmax_rows_gives_argmax_indices_ties_and_infinities_included():
    from prefixtune.generation import ARGMAX_CHUNK, argmax_rows

    g = torch.Generator().manual_seed(0)
    vocab = 8 * ARGMAX_CHUNK
    scores = torch.randn(12, vocab, generator=g)
    scores[1, [5, 3 * ARGMAX_CHUNK + 7, 7 * ARGMAX_CHUNK]] = 9.0  # ties in different chunks: the first wins
    scores[2, [ARGMAX_CHUNK + 9, ARGMAX_CHUNK + 4]] = 9.0  # ties within a chunk
    scores[3] = -float("inf")  # every token forbidden
    scores[4, 6 * ARGMAX_CHUNK + 1] = float("inf")
    scores[5, [2 * ARGMAX_CHUNK + 3, 4 * ARGMAX_CHUNK]] = float("nan")  # as argmax: the first NaN
    scores[6] = scores[6].round()  # many ties
    scores[7, -1] = 9.0  # the last position
    for rows in (scores, scores[:1], scores.to(torch.bfloat16)):
        assert torch.equal(argmax_rows(rows), rows.argmax(dim=-1))
    odd = torch.randn(3, vocab + 5, generator=g)  # no whole chunks: argmax as is
    assert torch.equal(argmax_rows(odd), odd.argmax(dim=-1))
