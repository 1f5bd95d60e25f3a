"""Fuzz-and-load session: valid and bad requests mixed, prefixes managed during the load (issue 16, point 8).

Starts the real HTTP server (uvicorn, in this process, loopback) on the default model with 8 prefixes.
``--clients`` threads send requests for ``--seconds``: valid generations (random options within their
bounds, some streamed, some through OpenAI's completions — n, logprobs, echo — and chat completions),
bad requests of many kinds (malformed JSON, wrong types, values out of bounds, lone surrogates, inputs
over the limit, unknown prefixes, invalid names, refused OpenAI fields, bad uploads, oversized bodies)
and prefix management (upload, list, delete with purge). Prints one JSON
line — requests sent, 5xx count, valid p50/p99 latency, RSS before and after — and writes
benchmarks/results/fuzz_load.md. The server must answer no request with a 5xx.

    python benchmarks/bench_fuzz_load.py [--seconds 120] [--clients 8]
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import psutil
from serving_harness import LiveServer, add_common_flags, e2e_sources, model_with_prefixes


def _raw(port: int, path: str, data: bytes, method: str = "POST") -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code
    except urllib.error.URLError as e:
        # An oversized body is answered 413 and the connection closed before all of it is sent; the client
        # sees its pipe break. Anything else is the server's failure (counted with the 5xx).
        if isinstance(e.reason, ConnectionError) and data is not None and len(data) > 1_000_000:
            return 413
        return 599


def _valid(rng: random.Random, names: list[str], sources: list[str]) -> tuple[str, dict]:
    options = {"max_new_tokens": rng.randint(1, 8)}
    kind = rng.choice(["greedy", "sample", "beam", "penalties"])
    if kind == "sample":
        options |= {"do_sample": True, "temperature": rng.uniform(0.1, 2), "top_p": rng.uniform(0.1, 1), "seed": 7}
    elif kind == "beam":
        options |= {"num_beams": rng.randint(2, 3), "length_penalty": rng.uniform(-1, 2)}
    elif kind == "penalties":
        options |= {"repetition_penalty": rng.uniform(1, 2), "no_repeat_ngram_size": 2, "stop": ["."]}
    if rng.random() < 0.4:  # OpenAI's routes, with n, logprobs and echo
        body = {"model": rng.choice(names), "max_tokens": options.pop("max_new_tokens"), "n": rng.randint(1, 2)}
        body |= {"temperature": options.get("temperature", 0.0), "stream": rng.random() < 0.5, "seed": 7}
        if rng.random() < 0.5:
            content = rng.choice(sources)
            body |= {"messages": [{"role": "user", "content": content}], "logprobs": rng.random() < 0.5}
            body |= {"top_logprobs": rng.randint(0, 5)} if body["logprobs"] else {}
            return "/v1/chat/completions", body
        body |= {"prompt": rng.choice(sources), "logprobs": rng.choice([None, 0, 3]), "echo": rng.random() < 0.3}
        body["max_tokens"] = 0 if body["echo"] and rng.random() < 0.5 else body["max_tokens"]
        return "/v1/completions", body
    inputs = [rng.choice(sources) for _ in range(rng.randint(1, 3))]
    return "/v1/generate", {"prefix": rng.choice(names), "inputs": inputs, "stream": rng.random() < 0.3, **options}


def _bad(rng: random.Random, names: list[str]) -> tuple[str, bytes]:
    prefix = rng.choice(names)
    bodies = [
        b'{"prefix": "a", "inputs": ',
        b"\xff\xfe not json",
        json.dumps({"prefix": prefix, "inputs": 5}).encode(),
        json.dumps({"prefix": prefix, "inputs": "x", "temperature": 5e-324, "do_sample": True}).encode(),
        json.dumps({"prefix": prefix, "inputs": "x", "seed": 2**64, "do_sample": True}).encode(),
        json.dumps({"prefix": prefix, "inputs": "x", "top_p": float("nan")}, allow_nan=True).encode(),
        json.dumps({"prefix": prefix, "inputs": "abc \ud800 def"}).encode(),
        json.dumps({"prefix": prefix, "inputs": "word " * 3000}).encode(),
        json.dumps({"prefix": prefix, "inputs": ["x"] * 500}).encode(),
        json.dumps({"prefix": "no-such-prefix", "inputs": "x"}).encode(),
        json.dumps({"prefix": "../etc", "inputs": "x"}).encode(),
        json.dumps({"prefix": prefix, "inputs": "x", "max_new_tokens": 10**9}).encode(),
        json.dumps({"prefix": prefix, "inputs": "x", "num_beams": 2, "do_sample": True}).encode(),
        json.dumps({"model": prefix, "prompt": "x", "max_tokens": -1}).encode(),
        b"x" * 2_000_000,
        json.dumps({"model": prefix, "messages": [], "max_tokens": 2}).encode(),
        json.dumps({"model": prefix, "messages": [{"role": "user", "content": "x"}], "tools": [{}]}).encode(),
        json.dumps({"model": prefix, "messages": [{"role": "robot", "content": "x"}]}).encode(),
        json.dumps({"model": prefix, "prompt": "", "max_tokens": 0, "echo": True, "logprobs": 1}).encode(),
    ]
    index = rng.randrange(len(bodies))
    path = "/v1/chat/completions" if index in (15, 16, 17) else "/v1/completions" if index in (13, 18) else None
    return path or "/v1/generate", bodies[index]


def main() -> None:
    from prefixtune.serving.app import ServerSettings, create_app

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120, help="length of the session (default: 120)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    add_common_flags(ap, "fuzz_load.md")
    args = ap.parse_args()

    model, tokenizer, names, prefix_dir = model_with_prefixes(args.model, 8, 4, "fuzz")
    upload = {
        "config": json.loads((prefix_dir / names[0] / "prefix_config.json").read_text()),
        "weights": base64.b64encode((prefix_dir / names[0] / "prefix.safetensors").read_bytes()).decode(),
    }
    sources = e2e_sources(args.data)[:200]
    app = create_app(model, tokenizer, prefix_dir, ServerSettings(max_input_tokens=512, max_new_tokens=64))
    server = LiveServer(app)
    server.post("/v1/generate", {"prefix": names[0], "inputs": sources[0], "max_new_tokens": 2})  # warm-up
    rss_before = psutil.Process().memory_info().rss / 2**20

    statuses: Counter = Counter()
    kinds: Counter = Counter()
    latencies: list[float] = []
    fivexx: list[str] = []
    deadline = time.monotonic() + args.seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            roll = rng.random()
            if roll < 0.5:
                path, body = _valid(rng, names, sources)
                started = time.perf_counter()
                status = _raw(server.port, path, json.dumps(body).encode())
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                kind = "valid"
            elif roll < 0.9:
                path, data = _bad(rng, names)
                status, kind = _raw(server.port, path, data), "bad"
            else:
                name = f"up{seed}-{rng.randrange(4)}"
                action = rng.choice(["upload", "delete", "list"])
                if action == "upload":
                    status = _raw(server.port, "/v1/prefixes", json.dumps({"name": name, **upload}).encode())
                elif action == "delete":
                    status = _raw(server.port, f"/v1/prefixes/{name}?purge=true", b"", method="DELETE")
                else:
                    status = _raw(server.port, "/v1/prefixes", None, method="GET")
                kind = "manage"
            kinds[kind] += 1
            statuses[status] += 1
            if status >= 500:
                fivexx.append(f"{kind} {status}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    health = server.post("/v1/generate", {"prefix": names[1], "inputs": sources[1], "max_new_tokens": 2})[0]
    rss_after = psutil.Process().memory_info().rss / 2**20
    server.stop()

    latencies.sort()
    summary = {
        "benchmark": "fuzz_load",
        "model": model.base_name,
        "seconds": args.seconds,
        "clients": args.clients,
        "requests": sum(kinds.values()),
        **{f"requests_{k}": v for k, v in sorted(kinds.items())},
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors_5xx": len(fivexx),
        "valid_p50_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
        "valid_p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3) if latencies else None,
        "rss_mb_before": round(rss_before),
        "rss_mb_after": round(rss_after),
        "serving_after": health == 200,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# bench_fuzz_load\n\n{args.clients} clients for {args.seconds:.0f} s against the real server (loopback, "
        f"model {model.base_name}): valid generations (random options, some streamed, some OpenAI-style), bad "
        "requests of 19 kinds, prefix uploads/deletes/lists during the load.\n\n"
        "| requests | valid | bad | manage | 5xx | valid p50 (s) | valid p99 (s) | RSS before → after (MB) |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {summary['requests']} | {kinds['valid']} | {kinds['bad']} | {kinds['manage']} | {len(fivexx)} | "
        f"{summary['valid_p50_s']} | {summary['valid_p99_s']} | {summary['rss_mb_before']} → "
        f"{summary['rss_mb_after']} |\n\nStatuses: {dict(sorted(statuses.items()))}\n"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
