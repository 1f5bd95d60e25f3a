"""The real server on a localhost port (issue 4, point 5): concurrent mixed prefixes, errors, shutdown."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from tiny import save_tiny_model_dir

from prefixtune import PrefixConfig, PrefixTunedModel, load_base
from prefixtune.decode import decode_texts

KEY = "test-key"
JOBS = [
    ("a", "name : The Vaults"),
    ("b", "food : English"),
    ("c", "area : riverside"),
    ("a", "near : Café Adriatic"),
    ("b", "name : The Mill | eatType : pub"),
    ("c", "priceRange : cheap"),
] * 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port, path, body=None, key=KEY, method=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv")
    model_dir = save_tiny_model_dir(root / "tiny-llama")
    base, tok = load_base(model_dir)
    model = PrefixTunedModel(base, tok)
    model.base_name = model_dir
    torch.manual_seed(5)
    for name, length in (("a", 3), ("b", 5), ("c", 2)):
        model.add_prefix(name, PrefixConfig(num_virtual_tokens=length, init_std=0.5))
        model.save_prefix(root / "prefixes" / name, name=name)
    port = _free_port()
    env = {**os.environ, "PREFIXTUNE_API_KEY": KEY}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefixtune",
            "serve",
            "--model",
            model_dir,
            "--prefixes",
            str(root / "prefixes"),
            "--port",
            str(port),
        ],
        env=env,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if _call(port, "/health", key=None)[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError(proc.stderr.read().decode())
    yield port, proc, model, tok
    if proc.poll() is None:
        proc.kill()


def test_concurrent_mixed_prefix_requests_equal_offline_generation(server):
    port, _, model, tok = server
    answers = {}

    def call(i, prefix, text):
        answers[i] = _call(port, "/v1/generate", {"prefix": prefix, "inputs": text, "max_new_tokens": 10})

    threads = [threading.Thread(target=call, args=(i, p, t)) for i, (p, t) in enumerate(JOBS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (prefix, text) in enumerate(JOBS):
        status, body = answers[i]
        assert status == 200
        assert body["outputs"] == decode_texts(model, tok, [text], prefix, options={"max_new_tokens": 10})
    status, metrics = (
        200,
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {KEY}"})
        )
        .read()
        .decode(),
    )
    assert 'prefixtune_requests_total{endpoint="/v1/generate",status="200"} 12' in metrics


def test_error_responses(server):
    port = server[0]
    assert _call(port, "/v1/prefixes", key=None)[0] == 401
    status, body = _call(port, "/v1/generate", {"prefix": "zzz", "inputs": "x"})
    assert status == 404 and body["error"]["field"] == "prefix"
    status, body = _call(port, "/v1/generate", {"prefix": "a", "inputs": "x", "max_new_tokens": "many"})
    assert status == 422 and body["error"]["field"] == "max_new_tokens"
    status, body = _call(port, "/v1/prefixes", {"name": "../../etc"})
    assert status == 422 and body["error"]["field"] == "name"
    assert _call(port, "/v1/completions", {"model": "b", "prompt": "x", "max_tokens": 3, "temperature": 0})[0] == 200
    assert _call(port, "/health", key=None)[1]["status"] == "ok"


def test_graceful_shutdown_finishes_requests_in_flight(server):
    port, proc, _, _ = server
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "r", _call(port, "/v1/generate", {"prefix": "a", "inputs": ["x"] * 8, "max_new_tokens": 200})
        )
    )
    thread.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    thread.join(timeout=120)
    status, body = result["r"]
    assert status == 200 and len(body["outputs"]) == 8
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once shut down
