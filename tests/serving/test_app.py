"""The HTTP API in-process (issue 4, points 1-4)."""

import base64
import json
import threading

import pytest
import torch
from fastapi.testclient import TestClient
from tiny import make_model

from prefixtune import PrefixConfig
from prefixtune.decode import decode_texts
from prefixtune.serving.app import ServerSettings, create_app

INPUTS = {
    "a": ["name : The Vaults | eatType : pub", "name : The Mill"],
    "b": ["food : English"],
    "c": ["area : riverside"],
}


def _client(served, **settings):
    model, tok, directory = served
    app = create_app(model, tok, directory, ServerSettings(**settings))
    assert app.state.registry.load_all() == {}
    return TestClient(app), model, tok


def _offline(model, tok, prefix, texts, **options):
    return decode_texts(model, tok, texts, prefix, options={"max_new_tokens": 8, **options})


def test_generate_equals_offline_and_never_echoes_the_input(served):
    client, model, tok = _client(served)
    with client:
        for prefix, texts in INPUTS.items():
            r = client.post("/v1/generate", json={"prefix": prefix, "inputs": texts, "max_new_tokens": 8})
            assert r.status_code == 200
            assert r.json() == {"prefix": prefix, "outputs": _offline(model, tok, prefix, texts)}
        single = client.post("/v1/generate", json={"prefix": "a", "inputs": INPUTS["a"][0], "max_new_tokens": 8})
        assert single.json()["outputs"] == _offline(model, tok, "a", INPUTS["a"][:1])


def test_concurrent_requests_with_different_prefixes_batch_together(served):
    client, model, tok = _client(served)
    results = {}
    with client:

        def call(prefix, text):
            r = client.post("/v1/generate", json={"prefix": prefix, "inputs": text, "max_new_tokens": 8})
            results[(prefix, text)] = r.json()["outputs"][0]

        threads = [threading.Thread(target=call, args=(p, t)) for p, ts in INPUTS.items() for t in ts for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = client.get("/metrics").text
    for (prefix, text), output in results.items():
        assert output == _offline(model, tok, prefix, [text])[0]
    assert "prefixtune_batch_size_bucket" in metrics and "prefixtune_generated_tokens_total" in metrics
    sizes = [
        int(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('prefixtune_batch_size_bucket{le="1"}')
    ]
    count = [int(line.split()[-1]) for line in metrics.splitlines() if line.startswith("prefixtune_batch_size_count")]
    assert count[0] > sizes[0], "some forward passes held more than one request"


def test_openai_completions(served):
    client, model, tok = _client(served)
    with client:
        r = client.post(
            "/v1/completions", json={"model": "b", "prompt": INPUTS["b"][0], "max_tokens": 8, "temperature": 0}
        )
        body = r.json()
        assert r.status_code == 200 and body["object"] == "text_completion" and body["model"] == "b"
        assert body["choices"][0]["text"] == _offline(model, tok, "b", INPUTS["b"])[0]
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] > 0
        sampled = client.post(
            "/v1/completions", json={"model": "b", "prompt": ["x", "y"], "max_tokens": 4, "temperature": 1.0, "seed": 3}
        )
        assert len(sampled.json()["choices"]) == 2


def _sse(response):
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_generate_and_completions(served):
    client, model, tok = _client(served)
    with client:
        r = client.post(
            "/v1/generate", json={"prefix": "a", "inputs": INPUTS["a"], "max_new_tokens": 8, "stream": True}
        )
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r)
        for i, want in enumerate(_offline(model, tok, "a", INPUTS["a"])):
            assert "".join(e["text"] for e in events if e["index"] == i) == want
            assert sum(1 for e in events if e["index"] == i and e["finish_reason"]) == 1
        r = client.post(
            "/v1/completions", json={"model": "c", "prompt": "q", "max_tokens": 5, "temperature": 0, "stream": True}
        )
        chunks = _sse(r)
        assert "".join(c["choices"][0]["text"] for c in chunks) == _offline(model, tok, "c", ["q"], max_new_tokens=5)[0]


def test_stop_strings_cut_the_output(served):
    client, model, tok = _client(served)
    with client:
        full = client.post("/v1/generate", json={"prefix": "a", "inputs": "x", "max_new_tokens": 12}).json()["outputs"][
            0
        ]
        assert len(full) > 3
        stop = full[2:4]
        cut = client.post("/v1/generate", json={"prefix": "a", "inputs": "x", "max_new_tokens": 12, "stop": stop})
        assert cut.json()["outputs"][0] == full[: full.find(stop)].strip()


def test_prefix_management(served, tmp_path):
    client, model, tok = _client(served)
    _, _, directory = served
    with client:
        assert sorted(p["name"] for p in client.get("/v1/prefixes").json()["prefixes"]) == ["a", "b", "c"]
        assert client.delete("/v1/prefixes/b").json() == {"deleted": "b", "purged": False}
        assert not model.has_prefix("b")  # unloaded; its folder stays, so the next use loads it again
        assert client.post("/v1/generate", json={"prefix": "b", "inputs": "x"}).status_code == 200
        assert client.post("/v1/prefixes", json={"name": "b"}).status_code == 201  # reload from the folder
        assert client.delete("/v1/prefixes/b?purge=true").status_code == 200
        assert client.post("/v1/generate", json={"prefix": "b", "inputs": "x"}).status_code == 404
        model.save_prefix(directory / "b", name="a")  # a folder "b" again
        assert client.post("/v1/prefixes", json={"name": "b"}).status_code == 201
        assert client.post("/v1/prefixes", json={"name": "zzz"}).status_code == 404
        for bad in ("../a", "a/../../etc", "..", "a/b"):
            r = client.post("/v1/prefixes", json={"name": bad})
            assert r.status_code in (400, 422) and "name" in r.json()["error"]["message"]  # schema pattern, or ".."
        upload = {
            "name": "d",
            "config": json.loads((directory / "a" / "prefix_config.json").read_text()),
            "weights": base64.b64encode((directory / "a" / "prefix.safetensors").read_bytes()).decode(),
        }
        assert client.post("/v1/prefixes", json=upload).status_code == 201
        assert (directory / "d" / "prefix.safetensors").is_file()
        a = client.post("/v1/generate", json={"prefix": "a", "inputs": "x", "max_new_tokens": 6}).json()["outputs"]
        d = client.post("/v1/generate", json={"prefix": "d", "inputs": "x", "max_new_tokens": 6}).json()["outputs"]
        assert a == d
        # a prefix trained on another base model is refused, naming both
        other, other_tok = make_model(seed=9)
        other.add_prefix("x", PrefixConfig(num_virtual_tokens=2))
        other.base_name = "other-base"
        other.save_prefix(tmp_path / "x", name="x")
        foreign = {
            "name": "x",
            "config": json.loads((tmp_path / "x" / "prefix_config.json").read_text()),
            "weights": base64.b64encode((tmp_path / "x" / "prefix.safetensors").read_bytes()).decode(),
        }
        r = client.post("/v1/prefixes", json=foreign)
        assert r.status_code == 400 and "other-base" in r.json()["error"]["message"]
        assert not (directory / "x").exists()


def test_api_key(served):
    client, _, _ = _client(served, api_key="s3cret")
    with client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/prefixes").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/v1/prefixes", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/prefixes", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = client.post(
            "/v1/generate", headers={"X-API-Key": "s3cret"}, json={"prefix": "a", "inputs": "x", "max_new_tokens": 2}
        )
        assert r.status_code == 200


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"prefix": "nope", "inputs": "x"}, 404, "prefix"),
        ({"prefix": "a", "inputs": 5}, 422, "inputs"),
        ({"prefix": "a", "inputs": "x", "max_new_tokens": -1}, 422, "max_new_tokens"),
        ({"prefix": "a", "inputs": "x", "max_new_tokens": 10_000}, 400, "max_new_tokens"),
        ({"prefix": "a", "inputs": ["x"] * 40}, 400, "inputs"),
        ({"prefix": "a", "inputs": "word " * 2000}, 400, "inputs"),
        ({"prefix": "a", "inputs": "x", "temperature": 0}, 422, "temperature"),
        ({"prefix": "a", "inputs": "x", "bogus": 1}, 422, "bogus"),
        ({"inputs": "x"}, 422, "prefix"),
    ],
)
def test_bad_requests_get_4xx_json_naming_the_field(served, body, status, field):
    client, _, _ = _client(served, max_input_tokens=256)
    with client:
        r = client.post("/v1/generate", json=body)
        assert r.status_code == status, r.text
        assert r.json()["error"]["field"] == field
        assert client.get("/health").json()["status"] == "ok"  # still serving


def test_malformed_json_and_oversized_bodies(served):
    client, _, _ = _client(served, max_body_bytes=2000)
    with client:
        r = client.post(
            "/v1/generate", content=b'{"prefix": "a", "inputs": ', headers={"content-type": "application/json"}
        )
        assert r.status_code == 400 and "error" in r.json()
        r = client.post("/v1/generate", json={"prefix": "a", "inputs": "x" * 5000})
        assert r.status_code == 413 and r.json()["error"]["field"] == "body"

        def chunks():
            yield b'{"prefix": "a", "inputs": "'
            yield b"x" * 5000
            yield b'"}'

        r = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_request_timeout_returns_504(served):
    client, _, _ = _client(served, request_timeout=0.001)
    with client:
        r = client.post("/v1/generate", json={"prefix": "a", "inputs": "x", "max_new_tokens": 200})
        assert r.status_code == 504 and "timed out" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200


def test_engine_errors_do_not_kill_the_server(served, monkeypatch):
    client, model, _ = _client(served)
    with client:
        original = model.base.forward

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(model.base, "forward", broken)
        r = client.post("/v1/generate", json={"prefix": "a", "inputs": "x", "max_new_tokens": 3})
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        monkeypatch.setattr(model.base, "forward", original)
        assert client.post("/v1/generate", json={"prefix": "a", "inputs": "x", "max_new_tokens": 3}).status_code == 200


def test_no_torch_grad_state_leaks():
    assert torch.is_grad_enabled()
