"""One request's failure is its own (issue 16, points 1-2): the others in its batch finish exactly as alone.

Failures: a request whose scores are not finite (a diverged prefix gives NaN), a prefix removed while
its requests wait, a client whose callbacks fail (gone away), text the tokenizer cannot encode, and
any unexpected exception in a route (a JSON 500 in the server's error shape, the server still up).
"""

import json

import pytest
import torch
from fastapi.testclient import TestClient

from prefixtune import PrefixConfig
from prefixtune.serving.app import ServerSettings, create_app
from prefixtune.serving.engine import Engine

from .test_engine import PROMPTS, Request, _alone, _model, _strip


def _poison(model, name="bad"):
    """A prefix whose values are NaN (a training run that diverged): its rows' scores are NaN."""
    prefix = model.add_prefix(name, PrefixConfig(num_virtual_tokens=4, reparameterize=False))
    with torch.no_grad():
        for part in prefix.parts.values():
            part.flat.fill_(float("nan"))


def _run(engine, requests):
    with torch.inference_mode():
        for r in requests:
            engine.submit(r)
        while engine.busy:
            engine.step()


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_request_with_non_finite_scores_fails_alone(family, num_beams):
    model = _model(family)
    _poison(model)
    engine = Engine(model, eos_token_ids=[2], pad_token_id=0, max_batch_size=8)
    done = {}
    good = [Request(p, ids, max_new_tokens=5, num_beams=num_beams) for p, ids in PROMPTS[:3]]
    bad = Request("bad", [5, 6, 7], max_new_tokens=5, num_beams=num_beams, do_sample=num_beams == 1)
    batch = [good[0], bad, *good[1:]]
    for i, r in enumerate(batch):
        r.on_done = lambda reason, tokens, i=i: done.__setitem__(i, reason)
    _run(engine, batch)
    assert done[1] == "error" and bad.error[0] == 500
    for i, (prefix, ids) in zip((0, 2, 3), PROMPTS[:3]):
        assert done[i] != "error"
        assert _strip(batch[i].tokens) == _strip(_alone(model, prefix, ids, max_new_tokens=5, num_beams=num_beams))


def test_removing_a_prefix_fails_only_its_waiting_requests_and_running_ones_finish():
    model = _model()
    engine = Engine(model, eos_token_ids=[], pad_token_id=0, max_batch_size=8)
    running = Request("b", [9, 10], max_new_tokens=6)
    waiting_b, waiting_a = Request("b", [11, 12], max_new_tokens=4), Request("a", [5, 6, 7, 8], max_new_tokens=4)
    with torch.inference_mode():
        engine.submit(running)
        engine.step()  # "b" is decoding
        engine.submit(waiting_b)
        engine.submit(waiting_a)
        model.remove_prefix("b")  # what DELETE /v1/prefixes/b does, under the engine's lock
        while engine.busy:
            engine.step()
    assert waiting_b.error == (404, "prefix 'b' was removed before the request started")
    assert len(running.tokens) == 6 and running.error is None  # its prefix is already in its cache
    assert waiting_a.tokens == _alone(model, "a", [5, 6, 7, 8], eos=(), max_new_tokens=4)


def test_a_client_whose_callbacks_fail_is_cancelled_alone():
    model = _model()
    engine = Engine(model, eos_token_ids=[], pad_token_id=0, max_batch_size=8)
    gone = Request("a", [5, 6], max_new_tokens=6)

    def broken(token):
        raise RuntimeError("Event loop is closed")

    gone.on_token = broken
    other = Request("c", [11, 12, 13], max_new_tokens=6)
    _run(engine, [gone, other])
    assert gone.cancelled and len(gone.tokens) == 1
    assert other.tokens == _alone(model, "c", [11, 12, 13], eos=(), max_new_tokens=6)


# ---------------------------------------------------------------------- HTTP
def _client(served, **settings):
    model, tok, directory = served
    app = create_app(model, tok, directory, ServerSettings(**settings))
    app.state.registry.load_all()
    return TestClient(app), model


def _events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


def test_streamed_failures_are_error_events_never_a_normal_finish(served):
    client, model = _client(served)
    with client:
        _poison(model)
        body = {"prefix": "bad", "inputs": ["x y", "z"], "max_new_tokens": 4, "stream": True}
        events = _events(client.post("/v1/generate", json=body))
        errors = [e for e in events if "error" in e]
        assert sorted(e["index"] for e in errors) == [0, 1] and errors[0]["error"]["status"] == 500
        assert not any(e.get("finish_reason") for e in events)
        body = {"model": "bad", "prompt": "x", "max_tokens": 4, "stream": True}
        events = _events(client.post("/v1/completions", json=body))
        assert events[-1]["error"]["type"] == "server_error"
        assert not any(c.get("finish_reason") for e in events for c in e.get("choices", []))
        plain = client.post("/v1/completions", json={"model": "bad", "prompt": "x", "max_tokens": 4})
        assert plain.status_code == 500 and "not numbers" in plain.json()["error"]["message"]
        ok = client.post("/v1/generate", json={"prefix": "a", "inputs": "x", "max_new_tokens": 3})
        assert ok.status_code == 200


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"prefix": "a", "inputs": "abc \ud800 def"}, 400, "inputs"),
        ({"prefix": "a", "inputs": ["ok", "\udfff"]}, 400, "inputs"),
        ({"prefix": "a", "inputs": "x", "do_sample": True, "seed": 2**64}, 422, "seed"),
        ({"prefix": "a", "inputs": "x", "do_sample": True, "seed": -1}, 422, "seed"),
        ({"prefix": "a", "inputs": "x", "do_sample": True, "temperature": 5e-324}, 422, "temperature"),
        ({"prefix": "a", "inputs": "x", "top_p": 0}, 422, "top_p"),
        ({"prefix": "a", "inputs": "x", "do_sample": 1}, 422, "do_sample"),
        ({"prefix": "a", "inputs": "x", "stream": "yes"}, 422, "stream"),
    ],
)
def test_inputs_outside_their_bounds_are_json_4xx(served, body, status, field):
    client, _ = _client(served)
    with client:
        r = client.post("/v1/generate", content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        assert r.json()["error"]["field"] == field
        again = client.post("/v1/generate", json={"prefix": "a", "inputs": "x", "max_new_tokens": 2})
        assert again.status_code == 200


def test_openai_temperature_below_the_bound_is_refused(served):
    client, _ = _client(served)
    with client:
        r = client.post("/v1/completions", json={"model": "a", "prompt": "x", "temperature": 5e-324})
        assert r.status_code == 422 and r.json()["error"]["field"] == "temperature"


def test_unexpected_exceptions_are_json_500_and_the_server_goes_on(served, monkeypatch):
    client, _ = _client(served)
    with client:
        registry = client.app.state.registry
        monkeypatch.setattr(registry, "describe", lambda name: 1 / 0)
        r = client.get("/v1/prefixes")
        assert r.status_code == 500
        assert r.json() == {"error": {"message": "internal error: ZeroDivisionError", "field": None}}
        monkeypatch.undo()
        assert client.get("/v1/prefixes").status_code == 200
        metrics = client.get("/metrics").text
        assert 'endpoint="/v1/prefixes",status="500"' in metrics


def test_metric_labels_are_route_templates_whatever_the_path(served):
    client, _ = _client(served, api_key="k")
    with client:
        for path in ("/v1/prefixes/evil%0Ainjected%201", "/x" * 300, "/v1/prefixes/a", "/nothing/here"):
            client.delete(path)
            client.get(path, headers={"Authorization": "Bearer k"})
        text = client.get("/metrics", headers={"Authorization": "Bearer k"}).text
        paths = {line.split('endpoint="')[1].split('"')[0] for line in text.splitlines() if 'endpoint="' in line}
        assert paths <= {"/v1/prefixes/{name}", "unmatched", "/metrics"}, paths
        assert "injected" not in text and "/x/x" not in text
