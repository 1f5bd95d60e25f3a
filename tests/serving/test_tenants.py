"""Tenants (issue 16, point 4): one API key cannot list, use, load or delete another's prefixes."""

import base64
import json

import pytest
from fastapi.testclient import TestClient

from prefixtune import PrefixConfig, PrefixTuneError
from prefixtune.serving.app import ServerSettings, create_app
from prefixtune.serving.tenants import read_keys

ACME, BETA, ADMIN = "acme-key-0001", "beta-key-0002", "admin-key-003"


@pytest.fixture
def tenants(served, tmp_path):
    """Prefixes acme-1, acme-2, beta-1 and shared; acme manages its own, beta only uses its own and shared."""
    model, tok, directory = served
    for name in ("acme-1", "acme-2", "beta-1", "shared"):
        model.add_prefix(name, PrefixConfig(num_virtual_tokens=2, init_std=0.5))
        model.save_prefix(directory / name, name=name)
        model.remove_prefix(name)
    keys = {
        ACME: {"prefixes": ["acme-*"], "manage": True},
        BETA: {"prefixes": ["beta-*", "shared"], "manage": False},
    }
    (tmp_path / "keys.json").write_text(json.dumps(keys))
    app = create_app(model, tok, directory, ServerSettings(keys=str(tmp_path / "keys.json"), api_key=ADMIN))
    app.state.registry.load_all()
    return TestClient(app), directory


def _as(key):
    return {"Authorization": f"Bearer {key}"}


def _names(client, key):
    return sorted(p["name"] for p in client.get("/v1/prefixes", headers=_as(key)).json()["prefixes"])


def _generate(client, key, prefix):
    return client.post("/v1/generate", headers=_as(key), json={"prefix": prefix, "inputs": "x", "max_new_tokens": 2})


def test_each_tenant_lists_and_uses_only_its_own_prefixes(tenants):
    client, _ = tenants
    with client:
        assert _names(client, ACME) == ["acme-1", "acme-2"]
        assert _names(client, BETA) == ["beta-1", "shared"]
        assert _names(client, ADMIN) == ["a", "acme-1", "acme-2", "b", "beta-1", "c", "shared"]  # --api-key: all
        assert _generate(client, ACME, "acme-1").status_code == 200
        assert _generate(client, BETA, "shared").status_code == 200
        hidden, missing = _generate(client, BETA, "acme-1"), _generate(client, BETA, "no-such")
        assert hidden.status_code == missing.status_code == 404  # another's prefix looks like none at all
        assert hidden.json()["error"] == {"message": "unknown prefix 'acme-1'", "field": "prefix"}
        body = {"model": "beta-1", "prompt": "x", "max_tokens": 2}
        assert client.post("/v1/completions", headers=_as(ACME), json=body).status_code == 404
        assert client.get("/v1/prefixes", headers=_as("wrong-key-000")).status_code == 401
        assert client.get("/v1/prefixes").status_code == 401


def test_only_managing_tenants_load_upload_and_delete_their_own(tenants):
    client, directory = tenants
    upload = {
        "config": json.loads((directory / "acme-1" / "prefix_config.json").read_text()),
        "weights": base64.b64encode((directory / "acme-1" / "prefix.safetensors").read_bytes()).decode(),
    }
    with client:
        assert client.post("/v1/prefixes", headers=_as(ACME), json={"name": "acme-3", **upload}).status_code == 201
        assert client.post("/v1/prefixes", headers=_as(ACME), json={"name": "beta-2", **upload}).status_code == 404
        assert client.post("/v1/prefixes", headers=_as(BETA), json={"name": "beta-2", **upload}).status_code == 403
        assert client.post("/v1/prefixes", headers=_as(BETA), json={"name": "beta-1"}).status_code == 403
        assert client.delete("/v1/prefixes/beta-1", headers=_as(ACME)).status_code == 404
        assert client.delete("/v1/prefixes/beta-1", headers=_as(BETA)).status_code == 403
        assert client.delete("/v1/prefixes/acme-2?purge=true", headers=_as(BETA)).status_code == 404
        assert (directory / "acme-2").is_dir() and not (directory / "beta-2").exists()
        assert client.delete("/v1/prefixes/acme-2?purge=true", headers=_as(ACME)).status_code == 200
        assert _names(client, ACME) == ["acme-1", "acme-3"] and _names(client, BETA) == ["beta-1", "shared"]
        assert client.delete("/v1/prefixes/shared", headers=_as(ADMIN)).status_code == 200


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "cannot read"),
        ("[]", "expected a JSON object"),
        ('{"short": {"prefixes": ["*"]}}', "at least 8 characters"),
        ('{"long-enough-key": {"prefixes": []}}', "non-empty list"),
        ('{"long-enough-key": {"prefixes": ["a*"], "manage": "yes"}}', "true or false"),
        ('{"long-enough-key": {"prefixes": ["a*"], "admin": true}}', "expected"),
    ],
)
def test_keys_files_are_checked_with_errors_that_say_what_to_fix(tmp_path, content, message):
    (tmp_path / "keys.json").write_text(content)
    with pytest.raises(PrefixTuneError, match=message):
        read_keys(tmp_path / "keys.json")


def test_one_key_over_its_requests_in_flight_gets_429_and_others_do_not(served, tmp_path):
    import threading
    import time

    model, tok, directory = served
    (tmp_path / "keys.json").write_text(json.dumps({k: {"prefixes": ["*"], "manage": False} for k in (ACME, BETA)}))
    settings = ServerSettings(keys=str(tmp_path / "keys.json"), max_requests_per_key=2)
    app = create_app(model, tok, directory, settings)
    app.state.registry.load_all()
    client, results = TestClient(app), []
    with client:
        with app.state.engine.lock:  # the engine is busy: requests stay in flight
            threads = [threading.Thread(target=lambda: results.append(_generate(client, ACME, "a"))) for _ in range(2)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            refused = _generate(client, ACME, "a")
            assert refused.status_code == 429 and "in flight" in refused.json()["error"]["message"]
            other = threading.Thread(target=lambda: results.append(_generate(client, BETA, "a")))
            other.start()
        for t in [*threads, other]:
            t.join(timeout=60)
        assert [r.status_code for r in results] == [200, 200, 200]
        assert _generate(client, ACME, "a").status_code == 200  # slots freed
