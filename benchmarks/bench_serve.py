"""Serving benchmark: mixed-prefix batching vs per-prefix batches vs one request at a time.

Starts the real HTTP server (uvicorn, in this process) on the default model with 8 prefixes and
sends 8 requests per prefix from concurrent clients:

  a. mixed: all 64 requests at once; the server batches them whatever their prefixes;
  b. per-prefix: one prefix's 8 requests at a time (what PEFT-style per-adapter batching allows);
  c. sequential: one request at a time.

Every request decodes exactly ``--new-tokens`` tokens (min = max), so all cases do the same work; each
case is run twice, the cases taking turns, and its faster round counts.
Then the server's engine, without HTTP, against offline ``generate`` on the same requests (1 and 64 rows):
milliseconds per decoding step (first token excluded), best of 2, and whether the tokens are the same —
the server decodes with the offline fast step; and the same requests submitted at once to the engine
without HTTP, at the default prefill budget and with none (what HTTP and the budget each cost).
Prints one JSON line and writes benchmarks/results/serve.md and serve.json.

    python benchmarks/bench_serve.py [--model M] [--prefixes 8] [--requests 8] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from serving_harness import LiveServer, add_common_flags, e2e_sources, model_with_prefixes


def _run(server: LiveServer, waves: list[list[dict]]) -> dict:
    """Send each wave's requests concurrently, waves one after another; time everything."""
    latencies: list[float] = []
    started = time.perf_counter()
    for wave in waves:

        def one(body):
            t = time.perf_counter()
            status, _ = server.post("/v1/generate", body)
            assert status == 200, status
            latencies.append(time.perf_counter() - t)

        threads = [threading.Thread(target=one, args=(b,)) for b in wave]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.perf_counter() - started
    n = sum(len(w) for w in waves)
    tokens = sum(b["max_new_tokens"] for w in waves for b in w)
    latencies.sort()
    return {
        "requests_per_s": n / elapsed,
        "tokens_per_s": tokens / elapsed,
        "seconds": elapsed,
        "p50_latency_s": statistics.median(latencies),
        "p99_latency_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
    }


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def _engine(model, tokenizer, size: int, budget: int):
    """The server's engine over ``model`` for ``size`` requests at once, admitting ``budget`` prompt tokens a step."""
    from prefixtune.serving.engine import Engine

    return Engine(model, [tokenizer.eos_token_id], _pad(tokenizer), max_batch_size=size, prefill_budget=budget)


def engine_vs_generate(model, tokenizer, names: list[str], sources: list[str], new: int, rows=(1, 64)) -> dict:
    """ms per decoding step of the server's engine and of offline ``generate`` on the same prompts and
    prefixes (best of 2 each, alternated), and whether their tokens agree."""
    from prefixtune import GenerationOptions
    from prefixtune.features import left_pad
    from prefixtune.serving.requests import Request
    from prefixtune.serving.text import prompt_ids

    pad = _pad(tokenizer)
    opts = GenerationOptions(max_new_tokens=new, min_new_tokens=new)
    result = {}
    for n in rows:
        prefixes = [names[i % len(names)] for i in range(n)]
        ids = [prompt_ids(model, tokenizer, p, s) for p, s in zip(prefixes, sources)]
        engine_ms, generate_ms, same = [], [], True
        for _ in range(2):
            engine = _engine(model, tokenizer, n, 1 << 30)
            requests = [engine.submit(Request(prefix=p, input_ids=i, options=opts)) for p, i in zip(prefixes, ids)]
            with torch.inference_mode():
                engine.step()  # prompts and first tokens
                started = time.perf_counter()
                while engine.busy:
                    engine.step()
            engine_ms.append(1000 * (time.perf_counter() - started) / (new - 1))
            x, mask = left_pad(ids, pad)
            started = time.perf_counter()
            model.generate(x, mask, prefix=prefixes, options=opts.replace(max_new_tokens=1, min_new_tokens=1))
            first = time.perf_counter() - started
            started = time.perf_counter()
            out = model.generate(x, mask, prefix=prefixes, options=opts)
            generate_ms.append(1000 * (time.perf_counter() - started - first) / (new - 1))
            same = same and [r.tokens for r in requests] == out[:, x.shape[1] :].tolist()
        result[n] = {"engine_ms_per_step": min(engine_ms), "generate_ms_per_step": min(generate_ms), "same": same}
    return result


def engine_alone(model, tokenizer, bodies: list[dict], budgets: list[int]) -> dict:
    """tokens/s of the server's engine without HTTP: every request submitted at once, prompts included, at
    each prefill budget (tokens admitted per step) — what the HTTP path and the budget each cost."""
    from prefixtune import GenerationOptions
    from prefixtune.serving.requests import Request
    from prefixtune.serving.text import prompt_ids

    result = {}
    for budget in budgets:
        engine = _engine(model, tokenizer, len(bodies), budget)
        started = time.perf_counter()
        for b in bodies:
            opts = GenerationOptions(max_new_tokens=b["max_new_tokens"], min_new_tokens=b["min_new_tokens"])
            engine.submit(
                Request(
                    prefix=b["prefix"], input_ids=prompt_ids(model, tokenizer, b["prefix"], b["inputs"]), options=opts
                )
            )
        with torch.inference_mode():
            while engine.busy:
                engine.step()
        result[budget] = sum(b["max_new_tokens"] for b in bodies) / (time.perf_counter() - started)
    return result


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def scale(model, tokenizer, source_dir: Path, bodies: list[dict], counts=(1, 100, 1000, 10_000)) -> dict:
    """Start-up seconds and RSS with ``count`` prefix folders on disk (hard links to one prefix's files), and
    throughput of the same requests over one prefix and over 64 distinct ones, at each count."""
    from prefixtune.serving.app import ServerSettings, create_app

    out = {}
    for count in counts:
        directory = Path(tempfile.mkdtemp(prefix=f"bench-scale-{count}-"))
        for i in range(count):
            folder = directory / f"p{i:05d}"
            folder.mkdir()
            for file in source_dir.iterdir():
                (folder / file.name).hardlink_to(file)
        for name in model.prefix_names():
            model.remove_prefix(name)
        rss = _rss_mb()
        started = time.perf_counter()
        app = create_app(model, tokenizer, directory, ServerSettings(max_batch_size=64, request_timeout=3600))
        server = LiveServer(app)
        startup = time.perf_counter() - started
        listed = len(app.state.registry.names())
        one = [{**b, "prefix": "p00000"} for b in bodies]
        many = [{**b, "prefix": f"p{(i * 7919) % count:05d}"} for i, b in enumerate(bodies)]
        row = {"startup_s": startup, "rss_mb_added": _rss_mb() - rss, "prefixes_listed": listed}
        row["distinct_first_use_tokens_per_s"] = _run(server, [many])["tokens_per_s"]  # each loads on first use
        row["one_prefix_tokens_per_s"] = _run(server, [one])["tokens_per_s"]
        row["distinct_prefixes_tokens_per_s"] = _run(server, [many])["tokens_per_s"]  # resident now
        row["distinct_prefixes"] = len({b["prefix"] for b in many})
        server.stop()
        out[count] = row
    return out


def main() -> None:
    from prefixtune.serving.app import ServerSettings, create_app

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefixes", type=int, default=8, help="number of prefixes (default: 8)")
    ap.add_argument("--requests", type=int, default=8, help="requests per prefix (default: 8)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per request (default: 32)")
    ap.add_argument(
        "--scale", type=int, nargs="*", default=[1, 100, 1000, 10_000], help="prefix folders on disk to measure at"
    )
    ap.add_argument("--only-scale", action="store_true", help="only the prefixes-on-disk runs (prints their JSON)")
    add_common_flags(ap, "serve.md")
    args = ap.parse_args()

    model, tokenizer, names, prefix_dir = model_with_prefixes(args.model, args.prefixes, 10, "serve")
    sources = e2e_sources(args.data)
    bodies = {
        name: [
            {
                "prefix": name,
                "inputs": sources[(i * args.requests + j) % len(sources)],
                "max_new_tokens": args.new_tokens,
                "min_new_tokens": args.new_tokens,
            }
            for j in range(args.requests)
        ]
        for i, name in enumerate(names)
    }

    if args.only_scale:
        everything = [b for name in names for b in bodies[name]]
        print(json.dumps(scale(model, tokenizer, prefix_dir / names[0], everything, args.scale)))
        return
    settings = ServerSettings(max_batch_size=args.prefixes * args.requests, request_timeout=3600)
    app = create_app(model, tokenizer, prefix_dir, settings)
    app.state.registry.load_all()
    server = LiveServer(app)
    _run(server, [[bodies[names[0]][0]]])  # warm-up
    everything = [b for name in names for b in bodies[name]]
    cases = {
        "mixed": [everything],
        "per_prefix": [bodies[name] for name in names],
        "sequential": [[b] for b in everything],
    }
    results = {name: {"tokens_per_s": 0.0} for name in cases}
    for _ in range(2):  # each case's faster of two rounds, the cases taking turns: this machine is shared
        for name, waves in cases.items():
            run = _run(server, waves)
            if run["tokens_per_s"] > results[name]["tokens_per_s"]:
                results[name] = run
    server.stop()
    for name in names:  # the registry loaded them into the model
        if not model.has_prefix(name):
            model.load_prefix(prefix_dir / name, name=name)
    alone = engine_alone(model, tokenizer, everything, [settings.prefill_budget, 1 << 30])
    step = engine_vs_generate(model, tokenizer, names, sources, args.new_tokens, rows=(1, len(everything)))
    scaled = scale(model, tokenizer, prefix_dir / names[0], everything, args.scale) if args.scale else {}

    mixed = results["mixed"]["tokens_per_s"]
    summary = {
        "benchmark": "serve",
        "model": model.base_name,
        "prefixes": args.prefixes,
        "requests": len(everything),
        "new_tokens": args.new_tokens,
        "torch_threads": torch.get_num_threads(),
        **{f"{case}_{k}": round(v, 4) for case, r in results.items() for k, v in r.items()},
        "speedup_vs_sequential": round(mixed / results["sequential"]["tokens_per_s"], 3),
        "speedup_vs_per_prefix": round(mixed / results["per_prefix"]["tokens_per_s"], 3),
        **{f"on_disk_{n}_{k}": round(v, 3) for n, row in scaled.items() for k, v in row.items()},
        **{f"rows_{n}_{k}": round(v, 2) if isinstance(v, float) else v for n, r in step.items() for k, v in r.items()},
        "engine_vs_generate_step_time": {
            n: round(r["engine_ms_per_step"] / r["generate_ms_per_step"], 3) for n, r in step.items()
        },
        "outputs_unchanged": all(r["same"] for r in step.values()),
        "engine_alone_tokens_per_s": round(alone[settings.prefill_budget], 2),
        "engine_alone_unlimited_budget_tokens_per_s": round(alone[1 << 30], 2),
    }
    if scaled:
        largest = scaled[max(scaled)]
        summary["distinct_vs_one_prefix"] = round(
            largest["distinct_prefixes_tokens_per_s"] / largest["one_prefix_tokens_per_s"], 3
        )
    rows = ["| case | requests/s | tokens/s | p50 latency (s) | p99 latency (s) |", "|---|---|---|---|---|"]
    labels = {
        "mixed": "a. mixed-prefix batching",
        "per_prefix": "b. per-prefix batches",
        "sequential": "c. one request at a time",
    }
    for case, r in results.items():
        rows.append(
            f"| {labels[case]} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
            f"{r['p50_latency_s']:.2f} | {r['p99_latency_s']:.2f} |"
        )
    table = "\n".join(rows)
    if scaled:
        rows = [
            "| prefix folders on disk | start-up (s) | RSS added (MB) | tokens/s, 1 prefix | tokens/s, "
            f"{len(everything)} distinct | ratio | tokens/s, distinct on first use |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, row in scaled.items():
            one, many = row["one_prefix_tokens_per_s"], row["distinct_prefixes_tokens_per_s"]
            rows.append(
                f"| {n:,} | {row['startup_s']:.2f} | {row['rss_mb_added']:.0f} | {one:.1f} | {many:.1f} | "
                f"{many / one:.2f} | {row['distinct_first_use_tokens_per_s']:.1f} |"
            )
        table += (
            "\n\nPrefixes on disk (each loaded on first use; "
            + str(len(everything))
            + " requests, "
            + "one prefix for all vs a distinct prefix each where there are enough):\n\n"
            + "\n".join(rows)
        )
    rows = ["| rows | engine ms/step | generate ms/step | ratio | same tokens |", "|---|---|---|---|---|"]
    for n, r in step.items():
        e, g = r["engine_ms_per_step"], r["generate_ms_per_step"]
        rows.append(f"| {n} | {e:.1f} | {g:.1f} | {e / g:.2f} | {r['same']} |")
    table += (
        "\n\nThe server's engine (no HTTP) against offline `generate`, same prompts and prefixes, "
        f"{args.new_tokens} tokens each, per decoding step (first token excluded), best of 2:\n\n" + "\n".join(rows)
    )
    table += (
        f"\n\nThe same {len(everything)} requests submitted at once to the engine without HTTP (prompts included): "
        f"{alone[settings.prefill_budget]:.1f} tokens/s at the default prefill budget of {settings.prefill_budget} "
        f"tokens per step, {alone[1 << 30]:.1f} with no budget (every prompt admitted in the first step)."
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    out.write_text(
        f"# bench_serve\n\n{len(everything)} requests ({args.prefixes} prefixes × {args.requests}), "
        f"{args.new_tokens} new tokens each, greedy, model {model.base_name}, "
        f"{torch.get_num_threads()} threads; cases a–c each the faster of two rounds, taking turns."
        f"\n\n{table}\n\nmixed vs sequential: "
        f"{summary['speedup_vs_sequential']}×; mixed vs per-prefix: {summary['speedup_vs_per_prefix']}×\n"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
