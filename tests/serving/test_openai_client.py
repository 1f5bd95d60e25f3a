"""The real ``openai`` client against the server (issue 16, point 7, in part): /v1/models, completions,
and parameters the server does not implement refused with a 400 naming them, never ignored."""

import socket
import threading
import time

import openai
import pytest
import uvicorn

from prefixtune.decode import decode_texts
from prefixtune.serving.app import ServerSettings, create_app


@pytest.fixture
def client(served):
    model, tok, directory = served
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


@pytest.mark.parametrize(
    "extra, named",
    [
        ({"n": 2}, "n"),
        ({"logprobs": 2}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"suffix": "!"}, "suffix"),
        ({"extra_body": {"guided_json": {}}}, "guided_json"),
    ],
)
def test_parameters_not_implemented_are_refused_naming_them(client, extra, named):
    api, _, _ = client
    with pytest.raises(openai.BadRequestError) as error:
        api.completions.create(model="a", prompt="x", max_tokens=2, **extra)
    assert error.value.status_code == 400 and named in str(error.value)
