"""Fairness benchmark: short requests' latency with and without one 1,000-token request among them.

Starts the real HTTP server (uvicorn, in this process) on the default model with 4 prefixes. Short
requests (E2E inputs, ``--new-tokens`` tokens each, min = max) arrive one every ``--gap`` seconds;
in the second run, one request with a ``--long-tokens`` prompt arrives among them. The target
(issue 16, point 5): the short requests' p99 latency with the long request is at most 2× their p99
without it. A third run repeats the second with the whole prompt prefilled in one pass (a prefill
budget larger than the prompt), which is what the server did before chunked prefill.

Prints one JSON line and writes benchmarks/results/fairness.md.

    python benchmarks/bench_fairness.py [--model M] [--short 24] [--gap 0.25] [--long-tokens 1000]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch
from serving_harness import LiveServer, add_common_flags, e2e_sources, model_with_prefixes


def _p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


def _session(server: LiveServer, shorts: list[dict], long: dict | None, gap: float) -> dict:
    """Send the short requests one every ``gap`` s (the long one after the first two); time each."""
    latencies, long_latency, threads = [], [], []

    def one(body, into):
        started = time.perf_counter()
        status, answer = server.post("/v1/generate", body)
        assert status == 200, answer
        into.append(time.perf_counter() - started)

    for i, body in enumerate(shorts):
        if long is not None and i == 2:
            threads.append(threading.Thread(target=one, args=(long, long_latency)))
            threads[-1].start()
        threads.append(threading.Thread(target=one, args=(body, latencies)))
        threads[-1].start()
        time.sleep(gap)
    for t in threads:
        t.join()
    return {
        "p50": sorted(latencies)[len(latencies) // 2],
        "p99": _p99(latencies),
        "long": long_latency[0] if long_latency else None,
    }


def main() -> None:
    from prefixtune.serving.app import ServerSettings, create_app

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=24, help="short requests per run (default: 24)")
    ap.add_argument("--gap", type=float, default=0.25, help="seconds between short requests (default: 0.25)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens each request generates (default: 16)")
    ap.add_argument("--long-tokens", type=int, default=1000, help="prompt tokens of the long request (default: 1000)")
    ap.add_argument("--prefill-budget", type=int, default=ServerSettings.prefill_budget, help="the server's setting")
    add_common_flags(ap, "fairness.md")
    args = ap.parse_args()

    model, tokenizer, names, prefix_dir = model_with_prefixes(args.model, 4, 10, "fair")
    sources = e2e_sources(args.data)
    new = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    shorts = [{"prefix": names[i % 4], "inputs": sources[i], **new} for i in range(args.short)]
    text = " ".join(sources[args.short :])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.long_tokens - 40]  # room for the template
    long = {"prefix": names[0], "inputs": tokenizer.decode(ids), **new}

    results = {}
    for case, budget in (("chunked", args.prefill_budget), ("one_pass", 10 * args.long_tokens)):
        settings = ServerSettings(max_batch_size=64, request_timeout=3600, prefill_budget=budget, max_input_tokens=4096)
        app = create_app(model, tokenizer, prefix_dir, settings)
        app.state.registry.load_all()
        server = LiveServer(app)
        server.post("/v1/generate", shorts[0])  # warm-up
        if case == "chunked":
            results["without_long"] = _session(server, shorts, None, args.gap)
        results[case] = _session(server, shorts, long, args.gap)
        server.stop()
        for name in names:
            model.remove_prefix(name)

    base_p99 = results["without_long"]["p99"]
    summary = {
        "benchmark": "fairness",
        "model": model.base_name,
        "short_requests": args.short,
        "gap_s": args.gap,
        "new_tokens": args.new_tokens,
        "long_prompt_tokens": args.long_tokens,
        "prefill_budget": args.prefill_budget,
        "torch_threads": torch.get_num_threads(),
        "p99_short_without_long_s": round(base_p99, 3),
        "p99_short_with_long_s": round(results["chunked"]["p99"], 3),
        "p99_ratio": round(results["chunked"]["p99"] / base_p99, 3),
        "p99_short_with_long_one_pass_s": round(results["one_pass"]["p99"], 3),
        "p99_ratio_one_pass": round(results["one_pass"]["p99"] / base_p99, 3),
        "long_latency_s": round(results["chunked"]["long"], 3),
        "long_latency_one_pass_s": round(results["one_pass"]["long"], 3),
    }
    rows = [
        "| run | short p50 (s) | short p99 (s) | p99 ÷ without | long request (s) |",
        "|---|---|---|---|---|",
        f"| short requests only | {results['without_long']['p50']:.2f} | {base_p99:.2f} | 1.00 | – |",
    ]
    for case, label in (
        (
            "chunked",
            f"with the long one, chunked ({max(16, args.prefill_budget // 8)} tokens/step while others decode)",
        ),
        ("one_pass", "with the long one, prefilled in one pass"),
    ):
        r = results[case]
        rows.append(f"| {label} | {r['p50']:.2f} | {r['p99']:.2f} | {r['p99'] / base_p99:.2f} | {r['long']:.2f} |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# bench_fairness\n\n{args.short} short requests (one every {args.gap} s, {args.new_tokens} new tokens), "
        f"one {args.long_tokens}-token prompt among them; model {model.base_name}, {torch.get_num_threads()} "
        f"threads. Target: p99 ÷ without ≤ 2.\n\n" + "\n".join(rows) + "\n"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
