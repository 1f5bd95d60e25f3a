"""The real ``openai`` client against the server (issue 16, point 7): /v1/models, completions and chat
completions (whole and streamed) with n, logprobs and echo, each checked against offline decoding or a
teacher-forced pass of the model; parameters the server does not implement are refused with a 400 naming
them, never ignored."""

import socket
import threading
import time

import openai
import pytest
import torch
import uvicorn

from prefixtune.decode import decode_texts
from prefixtune.serving.app import ServerSettings, create_app
from prefixtune.serving.text import prompt_ids

# A chat template for the tiny tokenizer (SmolLM2's own is ChatML; any template works the same way).
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


@pytest.fixture
def client(served):
    model, tok, directory = served
    tok.chat_template = TEMPLATE
    app = create_app(model, tok, directory, ServerSettings())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0), model, tok
    server.should_exit = True
    thread.join()


def test_models_are_the_prefixes_with_the_base_model_as_root(client):
    api, model, _ = client
    models = api.models.list().data
    assert sorted(m.id for m in models) == ["a", "b", "c"]
    assert {m.model_extra["root"] for m in models} == {model.base_name}
    assert api.models.retrieve("b").id == "b"
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("zzz")


def test_completions_equal_offline_decoding(client):
    api, model, tok = client
    text = "name : The Vaults | eatType : pub"
    answer = api.completions.create(model="a", prompt=text, max_tokens=6, temperature=0, n=1)
    assert answer.choices[0].text == decode_texts(model, tok, [text], "a", options={"max_new_tokens": 6})[0]
    assert answer.usage.completion_tokens > 0


def _teacher_forced(model, prefix, ids, tokens):
    """Log-probabilities of ``tokens`` after ``ids`` under the prefixed model, from one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + tokens[:-1]]), prefix=prefix).logits[0, len(ids) - 1 :]
    return torch.log_softmax(logits.float(), -1)[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()


def _greedy(model, tok, prefix, ids, max_new):
    """Offline greedy decoding of prompt ``ids``: (new tokens without an ending EOS, text)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), prefix=prefix, max_new_tokens=max_new, eos_token_id=[2])
    tokens = out[0, len(ids) :].tolist()
    tokens = tokens[: tokens.index(2)] if 2 in tokens else tokens
    return tokens, tok.decode(tokens, skip_special_tokens=True).strip()


MESSAGES = [{"role": "system", "content": "Describe the restaurant."}, {"role": "user", "content": "name : Aromi"}]


def _chat_ids(tok, messages=MESSAGES):
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_completion_equals_offline_decoding_of_the_templated_conversation(client):
    api, model, tok = client
    answer = api.chat.completions.create(model="b", messages=MESSAGES, max_tokens=8, temperature=0)
    tokens, text = _greedy(model, tok, "b", _chat_ids(tok), 8)
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == text
    assert answer.usage.prompt_tokens == len(_chat_ids(tok))
    # A different conversation gives a different prompt: the messages are used, not ignored.
    other = [{"role": "user", "content": "name : The Vaults | eatType : pub"}]
    again = api.chat.completions.create(model="b", messages=other, max_completion_tokens=8, temperature=0)
    assert again.choices[0].message.content == _greedy(model, tok, "b", _chat_ids(tok, other), 8)[1]


def test_chat_streams_chunks_that_add_up_to_the_whole_answer(client):
    api, _, _ = client
    whole = api.chat.completions.create(model="a", messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True)
    chunks = list(
        api.chat.completions.create(
            model="a",
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert "".join(p.delta.content or "" for p in pieces) == whole.choices[0].message.content
    assert [p.finish_reason for p in pieces][-1] == whole.choices[0].finish_reason
    assert all(p.finish_reason is None for p in pieces[:-1])
    streamed = [t.logprob for p in pieces if p.logprobs for t in p.logprobs.content]
    assert streamed == pytest.approx([t.logprob for t in whole.choices[0].logprobs.content])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_logprobs_are_the_models_with_their_bytes(client):
    api, model, tok = client
    answer = api.chat.completions.create(
        model="c", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    ids = _chat_ids(tok)
    tokens, text = _greedy(model, tok, "c", ids, 8)
    content = answer.choices[0].logprobs.content
    assert [t.logprob for t in content] == pytest.approx(_teacher_forced(model, "c", ids, tokens), abs=1e-4)
    assert bytes(b for t in content for b in t.bytes).decode("utf-8", errors="replace").strip() == text
    for t in content:  # greedy: the token chosen is the most likely of its alternatives
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)


def test_chat_needs_a_chat_template(client):
    api, _, tok = client
    tok.chat_template = None
    with pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(model="a", messages=MESSAGES, max_tokens=2)
    assert "chat template" in str(error.value)


def test_n_answers_per_prompt_in_order_each_seeded_apart(client):
    """n = 3 for two prompts: six choices, prompt i's answer j at index 3i + j, sampled with seed + j."""
    api, _, _ = client
    prompts = ["name : Aromi", "name : The Vaults | eatType : pub"]
    answer = api.completions.create(model="a", prompt=prompts, n=3, max_tokens=6, temperature=2.0, seed=11)
    assert [c.index for c in answer.choices] == list(range(6))
    for choice in answer.choices:
        prompt, j = prompts[choice.index // 3], choice.index % 3
        alone = api.completions.create(model="a", prompt=prompt, max_tokens=6, temperature=2.0, seed=11 + j)
        assert choice.text == alone.choices[0].text
    assert len({c.text for c in answer.choices[:3]}) > 1  # different seeds, different samples
    assert (
        answer.usage.prompt_tokens
        == api.completions.create(model="a", prompt=prompts, max_tokens=1).usage.prompt_tokens
    )
    chat = api.chat.completions.create(model="a", messages=MESSAGES, n=2, max_tokens=4, temperature=2.0, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]


def test_completion_logprobs_and_their_stream(client):
    api, model, tok = client
    text = "name : The Vaults | eatType : pub"
    answer = api.completions.create(model="b", prompt=text, max_tokens=8, temperature=0, logprobs=2)
    ids = prompt_ids(model, tok, "b", text)
    tokens, expected_text = _greedy(model, tok, "b", ids, 8)
    lp = answer.choices[0].logprobs
    assert answer.choices[0].text == expected_text
    assert lp.token_logprobs == pytest.approx(_teacher_forced(model, "b", ids, tokens), abs=1e-4)
    assert lp.tokens == [tok.decode([t]) for t in tokens]
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(
        1 <= len(top) <= 2 and max(top.values()) == pytest.approx(v)
        for top, v in zip(lp.top_logprobs, lp.token_logprobs)
    )
    stream = list(api.completions.create(model="b", prompt=text, max_tokens=8, temperature=0, logprobs=2, stream=True))
    assert "".join(c.choices[0].text for c in stream) == answer.choices[0].text
    assert [v for c in stream if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs] == pytest.approx(
        lp.token_logprobs
    )


def test_echo_scores_the_prompt_as_evaluation_harnesses_ask(client):
    """echo + logprobs + max_tokens 0 (lm-evaluation-harness's log-likelihood request): the prompt back with
    each token's log-probability given the prefix and the tokens before it; the first has none."""
    api, model, tok = client
    text = "name : Aromi | area : riverside"
    answer = api.completions.create(model="a", prompt=text, max_tokens=0, echo=True, logprobs=1)
    ids = tok(text, add_special_tokens=False)["input_ids"]  # the text's own tokens, no separator after them
    lp = answer.choices[0].logprobs
    assert answer.choices[0].text == text and answer.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(_teacher_forced(model, "a", ids[:1], ids[1:]), abs=1e-4)
    both = api.completions.create(model="a", prompt=text, max_tokens=5, echo=True, logprobs=0, temperature=0)
    plain = api.completions.create(model="a", prompt=text, max_tokens=5, temperature=0)
    assert both.choices[0].text == text + plain.choices[0].text
    prompt = prompt_ids(model, tok, "a", text)  # generating: the prompt ends with the separator
    assert len(both.choices[0].logprobs.tokens) == len(prompt) + len(_greedy(model, tok, "a", prompt, 5)[0])
    streamed = list(api.completions.create(model="a", prompt=text, max_tokens=5, echo=True, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == both.choices[0].text
    assert api.completions.create(model="a", prompt=text, max_tokens=0, echo=True).choices[0].text == text
    with pytest.raises(openai.BadRequestError, match="no tokens to score"):
        api.completions.create(model="a", prompt="", max_tokens=0, echo=True, logprobs=1)
    with pytest.raises(openai.BadRequestError, match="only allowed with echo"):
        api.completions.create(model="a", prompt=text, max_tokens=0)


@pytest.mark.parametrize(
    "extra, named",
    [
        ({"best_of": 3}, "best_of"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"suffix": "!"}, "suffix"),
        ({"logit_bias": {"5": 1}}, "logit_bias"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
    ],
)
def test_parameters_not_implemented_are_refused_naming_them(client, extra, named):
    api, _, _ = client
    with pytest.raises(openai.BadRequestError) as error:
        api.completions.create(model="a", prompt="x", max_tokens=2, **extra)
    assert error.value.status_code == 400 and named in str(error.value)


@pytest.mark.parametrize(
    "extra, named",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frequency_penalty": 1.0}, "frequency_penalty"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_chat_parameters_not_implemented_are_refused_naming_them(client, extra, named):
    api, _, _ = client
    with pytest.raises(openai.BadRequestError) as error:
        api.chat.completions.create(model="a", messages=MESSAGES, max_tokens=2, **extra)
    assert error.value.status_code == 400 and named in str(error.value)
