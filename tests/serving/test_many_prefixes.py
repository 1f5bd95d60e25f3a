"""Thousands of prefix folders (issue 16, point 6): nothing loads at start-up, each prefix loads on first
use, the least recently used are unloaded under the memory budget (never one a request is using), and a
folder whose files change is loaded again."""

import os

import pytest
from fastapi.testclient import TestClient

from prefixtune.decode import decode_texts
from prefixtune.serving.app import ServerSettings, create_app
from prefixtune.serving.registry import PrefixTooLarge


def _folders(directory, count):
    """``count`` more prefix folders p0000…, hard links to folder "a"'s files (no disk space)."""
    for i in range(count):
        folder = directory / f"p{i:04d}"
        folder.mkdir()
        for file in ("prefix_config.json", "prefix.safetensors"):
            os.link(directory / "a" / file, folder / file)


def _app(served, **settings):
    model, tok, directory = served
    app = create_app(model, tok, directory, ServerSettings(**settings))
    return TestClient(app), app.state.registry, model


def _generate(client, prefix):
    r = client.post("/v1/generate", json={"prefix": prefix, "inputs": "name : The Mill", "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    return r.json()["outputs"]


def test_start_up_loads_nothing_and_each_prefix_loads_on_first_use(served):
    _folders(served[2], 300)
    client, registry, model = _app(served)
    with client:
        assert model.prefix_names() == []
        listed = client.get("/v1/prefixes").json()["prefixes"]
        assert len(listed) == 303 and not any(p["resident"] for p in listed)
        assert {p["num_virtual_tokens"] for p in listed} == {3, 6, 2}
        first = _generate(client, "p0123")
        assert model.prefix_names() == ["p0123"]
        assert first == _generate(client, "a")  # the same files, the same answers
        assert client.post("/v1/generate", json={"prefix": "p9999", "inputs": "x"}).status_code == 404


def test_least_recently_used_prefixes_are_unloaded_under_the_memory_budget(served):
    _folders(served[2], 4)
    client, registry, model = _app(served, max_prefix_memory=10**9)
    with client:
        _generate(client, "p0000")
        one = model.resident_bytes("p0000")
    client, registry, model = _app(served, max_prefix_memory=2 * one + one // 2)  # room for two
    for name in model.prefix_names():
        model.remove_prefix(name)
    with client:
        for name in ("p0000", "p0001", "p0002"):
            _generate(client, name)
        assert sorted(model.prefix_names()) == ["p0001", "p0002"]  # p0000 was the least recently used
        _generate(client, "p0001")
        _generate(client, "p0003")
        assert sorted(model.prefix_names()) == ["p0001", "p0003"]
        assert model.resident_bytes() <= 2 * one + one // 2


def test_a_prefix_in_use_is_never_unloaded(served):
    _folders(served[2], 2)
    client, registry, model = _app(served, max_prefix_memory=10**9)
    registry.acquire("p0000")
    one = model.resident_bytes("p0000")
    registry.settings.max_prefix_memory = one + one // 2  # room for one
    with pytest.raises(PrefixTooLarge, match="even after unloading"):
        registry.acquire("p0001")
    assert model.prefix_names() == ["p0000"]
    registry.release("p0000")
    registry.acquire("p0001")
    assert model.prefix_names() == ["p0001"]


def test_a_folder_whose_files_change_is_loaded_again(served):
    model, tok, directory = served
    client, registry, model = _app(served)
    with client:
        _generate(client, "a")
        _generate(client, "b")
        assert model.get_prefix("a").num_tokens == 3
        model.save_prefix(directory / "a", name="b")  # folder "a" now holds prefix "b" (6 tokens)
        after = _generate(client, "a")
        assert model.get_prefix("a").num_tokens == 6
        assert after == decode_texts(model, tok, ["name : The Mill"], "b", options={"max_new_tokens": 6})


def test_requests_arriving_together_for_a_prefix_not_yet_resident_load_it_once(served, monkeypatch):
    """Concurrent first use: one request loads the folder, the others wait for it and find it resident (two
    loads replaced a prefix under requests already submitted with it, and a concurrent request got a 400)."""
    import threading
    import time

    from prefixtune.serving import registry as registry_module

    client, registry, model = _app(served)
    reads = []
    read = registry_module.read_prefix_folder

    def slow_read(*args, **kwargs):
        reads.append(args[1])
        time.sleep(0.3)  # a large prefix: the others arrive while it is read
        return read(*args, **kwargs)

    monkeypatch.setattr(registry_module, "read_prefix_folder", slow_read)
    errors = []

    def use():
        try:
            registry.acquire("b")
            assert model.has_prefix("b")
            registry.release("b")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=use) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(reads) == 1
    with client:
        assert _generate(client, "b") == decode_texts(
            model, served[1], ["name : The Mill"], "b", options={"max_new_tokens": 6}
        )
