"""Continuous batching engine (issue 4, point 2): mixed prefixes, joining mid-flight, equal to alone."""

import threading

import pytest
import torch
from tiny import tiny_model

from prefixtune import GenerationOptions, PrefixConfig, PrefixTunedModel
from prefixtune.serving.engine import Engine
from prefixtune.serving.engine import Request as _Request


def Request(prefix, input_ids, on_done=None, should_stop=None, **options):  # noqa: N802 - reads like the class
    return _Request(prefix, input_ids, GenerationOptions(**options), on_done=on_done, should_stop=should_stop)


def _model(family="llama"):
    torch.manual_seed(3)
    model = PrefixTunedModel.wrap(tiny_model(family), PrefixConfig(num_virtual_tokens=3, init_std=0.5), name="a")
    model.add_prefix("b", PrefixConfig(num_virtual_tokens=6, init_std=0.5))
    model.add_prefix("c", PrefixConfig(num_virtual_tokens=2, init_std=0.5, reparameterize=False))
    return model.eval()


def _alone(model, prefix, ids, eos=(2,), **kw):
    out = model.generate(torch.tensor([ids]), prefix=prefix, eos_token_id=list(eos), pad_token_id=0, **kw)
    return out[0, 1 if model.geometry.is_encoder_decoder else len(ids) :].tolist()


def _strip(tokens):
    return tokens[: tokens.index(2) + 1] if 2 in tokens else tokens


PROMPTS = [("a", [5, 6, 7, 8]), ("b", [9, 10]), ("c", [11, 12, 13]), ("a", [14]), ("b", [15, 16, 17, 18, 19])]


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5", "bart"])
@pytest.mark.parametrize("eos", [(2,), ()])
def test_requests_arriving_at_different_times_equal_each_alone(family, eos):
    """Prefixes of lengths 3, 6 and 2; without EOS every request runs to its length, so all five overlap."""
    model = _model(family)
    engine = Engine(model, eos_token_ids=list(eos), pad_token_id=0, max_batch_size=8)
    done = {}
    requests = [
        Request(
            prefix=p, input_ids=ids, max_new_tokens=6 + i, on_done=lambda reason, toks, i=i: done.__setitem__(i, toks)
        )
        for i, (p, ids) in enumerate(PROMPTS)
    ]
    with torch.inference_mode():
        engine.submit(requests[0])
        engine.submit(requests[1])
        engine.step()
        engine.step()  # two requests running, then three more join mid-flight
        for r in requests[2:]:
            engine.submit(r)
        while engine.busy:
            engine.step()
    for i, (prefix, ids) in enumerate(PROMPTS):
        want = _alone(model, prefix, ids, eos, max_new_tokens=6 + i)
        assert done[i] == (_strip(want) if eos else want), (family, i)
    if not eos:
        assert max(engine.stats.batch_sizes) == 5  # all five decoded in one forward pass, whatever the family


def test_beam_requests_and_min_new_tokens():
    model = _model()
    engine = Engine(model, eos_token_ids=[2], pad_token_id=0)
    results = {}
    with torch.inference_mode():
        engine.submit(
            Request("b", [9, 10], num_beams=3, max_new_tokens=5, on_done=lambda r, t: results.__setitem__("beam", t))
        )
        engine.submit(
            Request(
                "a", [5, 6], min_new_tokens=4, max_new_tokens=4, on_done=lambda r, t: results.__setitem__("min", (r, t))
            )
        )
        while engine.busy:
            engine.step()
    assert results["beam"] == _strip(_alone(model, "b", [9, 10], num_beams=3, max_new_tokens=5))
    reason, tokens = results["min"]
    assert len(tokens) == 4 and 2 not in tokens and reason == "length"


def test_background_thread_serves_concurrent_submissions_and_drains_on_stop():
    model = _model()
    engine = Engine(model, eos_token_ids=[2], pad_token_id=0)
    engine.start()
    finished = threading.Event()
    results = {}

    def done(i):
        def callback(reason, tokens):
            results[i] = tokens
            if len(results) == len(PROMPTS):
                finished.set()

        return callback

    for i, (prefix, ids) in enumerate(PROMPTS):
        engine.submit(Request(prefix, ids, max_new_tokens=5, on_done=done(i)))
    engine.stop(drain=True)
    assert finished.is_set()
    for i, (prefix, ids) in enumerate(PROMPTS):
        assert results[i] == _strip(_alone(model, prefix, ids, max_new_tokens=5))


def test_stop_callback_and_cancel():
    model = _model()
    engine = Engine(model, eos_token_ids=[], pad_token_id=0)
    out = {}
    with torch.inference_mode():
        engine.submit(
            Request(
                "a",
                [5, 6],
                max_new_tokens=20,
                should_stop=lambda toks: len(toks) >= 3,
                on_done=lambda r, t: out.__setitem__("stop", (r, len(t))),
            )
        )
        cancelled = engine.submit(Request("b", [7], max_new_tokens=20, on_done=lambda r, t: out.__setitem__("c", r)))
        engine.step()
        cancelled.cancelled = True
        while engine.busy:
            engine.step()
    assert out["stop"] == ("stop", 3) and out["c"] == "cancelled"


def test_sampling_is_seeded_per_request():
    model = _model()
    engine = Engine(model, eos_token_ids=[], pad_token_id=0)
    got = []
    with torch.inference_mode():
        for _ in range(2):
            engine.submit(
                Request(
                    "a",
                    [5, 6],
                    do_sample=True,
                    temperature=2.0,
                    top_p=0.9,
                    top_k=20,
                    seed=7,
                    max_new_tokens=8,
                    on_done=lambda r, t: got.append(t),
                )
            )
        while engine.busy:
            engine.step()
    assert got[0] == got[1] and len(got[0]) == 8


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding():
    model = _model()
    engine = Engine(model, eos_token_ids=[], pad_token_id=0, max_batch_size=8, prefill_budget=8)
    short = [Request("a", [5, 6, 7], max_new_tokens=12), Request("c", [8, 9], max_new_tokens=12)]
    long_ids = [(i * 7) % 90 + 3 for i in range(30)]
    long = Request("b", long_ids, max_new_tokens=5)
    with torch.inference_mode():
        for r in short:
            engine.submit(r)
        engine.step()
        engine.submit(long)
        progress = []
        while not long.tokens:
            engine.step()
            progress.append([len(r.tokens) for r in short])
        while engine.busy:
            engine.step()
    # 30 prompt tokens at most 8 (then 4 with the short ones' budget used) per step: several steps, during
    # each of which every short request still got its next token
    assert len(progress) >= 4
    assert all(b == [a[0] + 1, a[1] + 1] for a, b in zip(progress, progress[1:]))
    assert long.tokens == _alone(model, "b", long_ids, eos=(), max_new_tokens=5)
    for r, (prefix, ids) in zip(short, [("a", [5, 6, 7]), ("c", [8, 9])]):
        assert r.tokens == _alone(model, prefix, ids, eos=(), max_new_tokens=12)


def _teacher_forced(model, prefix, ids, tokens):
    """Each of ``tokens``' log-probability after ``ids`` and the tokens before it: one forward pass, log-softmax."""
    if model.geometry.is_encoder_decoder:
        start = model.base.config.decoder_start_token_id
        logits = model(
            torch.tensor([ids]), prefix=prefix, decoder_input_ids=torch.tensor([[start, *tokens[:-1]]])
        ).logits[0]
    else:
        logits = model(torch.tensor([ids + tokens[:-1]]), prefix=prefix).logits[0, len(ids) - 1 :]
    return torch.log_softmax(logits.float(), -1)[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()


@pytest.mark.parametrize("family", ["llama", "bart"])
@pytest.mark.parametrize("beams", [1, 3])
def test_token_logprobs_are_the_models_distribution_whatever_the_decoding(family, beams):
    """Continuous (greedy, sampled) and static (beam) requests record each token's log-probability and the
    most likely alternatives; they equal a teacher-forced pass over the answer, and decoding is unchanged."""
    model = _model(family)
    engine = Engine(model, eos_token_ids=[2], pad_token_id=0, max_batch_size=8)
    kinds = [dict(num_beams=beams), dict(do_sample=True, temperature=3.0, seed=4, num_beams=1)]
    requests = []
    for kind in kinds[: 2 if beams == 1 else 1]:
        for prefix, ids in PROMPTS[:3]:
            requests.append(_Request(prefix, ids, GenerationOptions(max_new_tokens=5, **kind), logprobs=3))
    with torch.inference_mode():
        for r in requests:
            engine.submit(r)
        while engine.busy:
            engine.step()
    for r in requests:
        if not r.options.do_sample:
            assert r.tokens == _strip(_alone(model, r.prefix, r.input_ids, max_new_tokens=5, num_beams=beams))
        assert [s.token for s in r.token_logprobs] == r.tokens
        expected = _teacher_forced(model, r.prefix, r.input_ids, r.tokens)
        assert [s.logprob for s in r.token_logprobs] == pytest.approx(expected, abs=1e-4)
        for s in r.token_logprobs:
            assert len(s.top) == 3 and s.top[0][1] >= s.top[1][1] >= s.top[2][1] and s.top[0][1] >= s.logprob - 1e-6
        if beams == 1 and not r.options.do_sample:  # greedy: the chosen token is the most likely one
            assert all(s.top[0][0] == s.token for s in r.token_logprobs)


def test_prompt_scores_and_score_only_requests():
    """OpenAI's echo with logprobs: the prompt's own tokens are scored (the first has nothing to predict it);
    a score-only request generates nothing and leaves the others' answers unchanged."""
    model = _model()
    engine = Engine(model, eos_token_ids=[2], pad_token_id=0, max_batch_size=8)
    ids = [5, 6, 7, 8, 9]
    scored = _Request("b", ids, GenerationOptions(max_new_tokens=4), prompt_logprobs=2, score_only=True)
    other = _Request("a", [9, 10], GenerationOptions(max_new_tokens=4))
    reasons = []
    scored.on_done = lambda reason, tokens: reasons.append((reason, tokens))
    with torch.inference_mode():
        engine.submit(scored)
        engine.submit(other)
        while engine.busy:
            engine.step()
    assert reasons == [("length", [])]
    assert scored.prompt_scores[0].logprob is None and [s.token for s in scored.prompt_scores] == ids
    expected = _teacher_forced(model, "b", ids[:1], ids[1:])
    assert [s.logprob for s in scored.prompt_scores[1:]] == pytest.approx(expected, abs=1e-4)
    assert other.tokens == _strip(_alone(model, "a", [9, 10], max_new_tokens=4))
