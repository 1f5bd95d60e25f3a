"""Prefix uploads and folders are not trusted (issue 16, point 3).

The tensors define a prefix and must agree with its config; limits on prefix length, file size and
the memory all resident prefixes take; plain names; folders replaced atomically with the usual
permissions; DELETE with ``purge=true`` removes the folder too.
"""

import base64
import json
import os

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load, save

from prefixtune.serving.app import ServerSettings, create_app


def _client(served, **settings):
    model, tok, directory = served
    for name in model.prefix_names():  # a fresh server over the same model
        model.remove_prefix(name)
    app = create_app(model, tok, directory, ServerSettings(**settings))
    app.state.registry.load_all()
    return TestClient(app), model, directory


def _upload(directory, name, source="a", config_changes=None, tensors=None):
    config = json.loads((directory / source / "prefix_config.json").read_text())
    for key, value in (config_changes or {}).items():
        if key == "num_virtual_tokens":
            config["prefix_config"]["num_virtual_tokens"] = value
        config[key] = value
    raw = (directory / source / "prefix.safetensors").read_bytes()
    if tensors is not None:
        raw = save(tensors(load(raw)))
    return {"name": name, "config": config, "weights": base64.b64encode(raw).decode()}


def _one_token(tensors):
    return {k: v[:1].clone() for k, v in tensors.items()}


def test_the_tensors_define_the_prefix_not_the_config(served):
    client, model, directory = _client(served)
    with client:
        before = model.resident_bytes()
        # one token of tensors declared as 500 tokens (and the parts listed to match the tensors)
        body = _upload(directory, "big", config_changes={"num_virtual_tokens": 500}, tensors=_one_token)
        body["config"]["parts"] = {k: [1, *v[1:]] for k, v in body["config"]["parts"].items()}
        r = client.post("/v1/prefixes", json=body)
        assert r.status_code == 400 and "do not match" in r.json()["error"]["message"], r.text
        assert model.resident_bytes() == before and not model.has_prefix("big")
        assert not (directory / "big").exists() and not [p for p in directory.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensors_are_refused(served, value):
    client, model, directory = _client(served)

    def poisoned(tensors):
        out = {k: v.clone() for k, v in tensors.items()}
        next(iter(out.values())).view(-1)[3] = value
        return out

    with client:
        r = client.post("/v1/prefixes", json=_upload(directory, "nan", tensors=poisoned))
        assert r.status_code == 400 and "not finite" in r.json()["error"]["message"]
        assert not model.has_prefix("nan") and not (directory / "nan").exists()


def test_limits_on_length_size_and_resident_memory(served):
    _, _, directory = served
    size = (directory / "a" / "prefix.safetensors").stat().st_size
    client, model, _ = _client(served, max_prefix_tokens=4)  # "b" holds 6 tokens: refused at start-up
    with client:
        assert not model.has_prefix("b") and model.has_prefix("a")
        r = client.post("/v1/prefixes", json=_upload(directory, "b6", source="b"))
        assert r.status_code == 413 and "6 virtual tokens" in r.json()["error"]["message"]
    client, model, _ = _client(served, max_prefix_bytes=size - 1)
    with client:
        assert model.prefix_names() == ["c"]  # the 2-token prefix only
        assert client.post("/v1/prefixes", json=_upload(directory, "a2")).status_code == 413
    budget = model.resident_bytes("c") + size + 10  # room for "c" and one more like "a"
    client, model, _ = _client(served, max_prefix_memory=budget)
    with client:
        assert model.prefix_names() and model.resident_bytes() <= budget  # loading all evicted the older ones
        assert client.post("/v1/prefixes", json=_upload(directory, "more")).status_code == 201
        assert "more" in model.prefix_names() and model.resident_bytes() <= budget  # the least recently used left
        r = client.post("/v1/prefixes", json=_upload(directory, "b6", source="b"))  # larger than the whole budget
        assert r.status_code == 413 and "budget" in r.json()["error"]["message"]
        assert model.resident_bytes() <= budget


@pytest.mark.parametrize("name", ["a\n", "a b", "tab\there", "x\x00", " a", "é"])
def test_names_are_plain(served, name):
    client, _, directory = _client(served)
    with client:
        r = client.post("/v1/prefixes", json=_upload(directory, name))
        assert r.status_code == 422 and r.json()["error"]["field"] == "name"
        assert sorted(p.name for p in directory.iterdir()) == ["a", "b", "c"]


def test_uploads_replace_folders_with_the_usual_permissions_and_purge_removes_them(served):
    client, model, directory = _client(served, max_body_bytes=2000)  # uploads have their own, larger limit
    os.mkdir(directory / "plain")
    usual = (directory / "plain").stat().st_mode & 0o777
    os.rmdir(directory / "plain")
    with client:
        for _ in range(2):  # create, then overwrite
            assert client.post("/v1/prefixes", json=_upload(directory, "d", source="b")).status_code == 201
            assert (directory / "d").stat().st_mode & 0o777 == usual
            assert oct((directory / "d" / "prefix.safetensors").stat().st_mode & 0o777) != oct(0o600)
        assert model.get_prefix("d").num_tokens == 6
        assert client.delete("/v1/prefixes/d").json() == {"deleted": "d", "purged": False}
        assert (directory / "d").is_dir()  # unloaded only: it loads again at the next start
        assert client.post("/v1/prefixes", json={"name": "d"}).status_code == 201
        assert client.delete("/v1/prefixes/d?purge=true").json() == {"deleted": "d", "purged": True}
        assert not (directory / "d").exists()
        assert sorted(p.name for p in directory.iterdir()) == ["a", "b", "c"]  # no staging or trash left
    again, model, _ = _client(served)
    assert "d" not in model.prefix_names()
