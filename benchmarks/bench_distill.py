"""Prompt distillation benchmark: a 424-token instruction prompt compressed into 8, 16 and 32 virtual tokens.

Default model, fp32. The prompt (``benchmarks/distill/prompt.txt``) is a real few-shot instruction for
E2E-style rewriting (rules plus five worked examples). Training inputs: unique E2E dev meaning
representations; held-out inputs: unique E2E test ones (disjoint). For each prefix length and
initialization, ``prefixtune.distill`` trains a prefix; then on the held-out inputs, along the
teacher's greedy continuations (the teacher = the model with the prompt's tokens in front):

- greedy-token agreement: the student's most likely next token equals the teacher's;
- KL(teacher ‖ student) per token;
- exact match: the student's own greedy output equals the teacher's, whole.

The same for the initial prefix before training (step 0). Then the real HTTP server on loopback,
one batch of concurrent held-out requests per case: the prompt sent as text in each request, the
prompt held as its own keys and values (a prefix of its full length: what prompt caching gives),
and the distilled prefix; per-request prefill tokens and generated tokens/s.

Resumable: the teacher's continuations and every run are kept under ``--work``; a killed benchmark
continues where it stopped. Prints one JSON line; writes ``benchmarks/results/distill.md``,
``distill.json`` and ``distill.png`` (agreement vs P).

    python benchmarks/bench_distill.py [--tokens 8 16 32] [--inits first pool] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from serving_harness import DATA, LiveServer

from prefixtune import PrefixConfig, PrefixTunedModel, load_base
from prefixtune.data import group_references, load_examples
from prefixtune.distill import (
    TEACHER,
    TEACHER_FILE,
    Distillation,
    DistillConfig,
    distill,
    initial_prefix,
    load_teacher,
    prompt_values,
    save_teacher,
)
from prefixtune.prefix import Prefix

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _sources(split: str, count: int, seed: int) -> list[str]:
    unique = [source for source, _ in group_references(load_examples("e2e", DATA, split))]
    random.Random(seed).shuffle(unique)
    return unique[:count]


def _teacher(job: Distillation, name: str, sources: list[list[int]], work: Path, batch: int) -> list[list[int]]:
    """The teacher's continuations of ``sources``, generated once and kept in ``work/NAME.jsonl``."""
    key = job.teacher_key(sources)
    cached = load_teacher(work / f"{name}.jsonl", key)
    if cached is not None:
        return cached
    print(f"teacher continuations of {len(sources)} {name} inputs", file=sys.stderr, flush=True)
    out = job.continuations(sources, batch, progress=True)
    save_teacher(work / f"{name}.jsonl", key, out, job.tokenizer)
    return out


def _exact(job: Distillation, name: str, sources, continuations, batch: int) -> float:
    """Share of held-out inputs whose whole greedy output under prefix ``name`` equals the teacher's."""
    ours = job.continuations(sources, batch, prefix=name)
    return sum(a == b for a, b in zip(ours, continuations)) / len(sources)


def _serve(model, tokenizer, folder: Path, cases: dict[str, tuple[str, list[str]]], new: int) -> dict:
    """Per case (prefix, input texts): the texts sent concurrently to the real server; prefill tokens and tokens/s."""
    from prefixtune.serving.app import ServerSettings, create_app
    from prefixtune.serving.text import prompt_ids

    settings = ServerSettings(max_batch_size=64, request_timeout=3600, max_input_tokens=2048)
    app = create_app(model, tokenizer, folder, settings)
    app.state.registry.load_all()
    server = LiveServer(app)
    results = {}
    try:
        for case, (prefix, texts) in cases.items():
            bodies = [{"prefix": prefix, "inputs": t, "max_new_tokens": new, "min_new_tokens": new} for t in texts]
            server.post("/v1/generate", bodies[0])  # warm-up
            started = time.perf_counter()
            threads = [threading.Thread(target=server.post, args=("/v1/generate", b)) for b in bodies]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            prefill = [len(prompt_ids(model, tokenizer, prefix, t)) for t in texts]
            results[case] = {
                "prefix_tokens": model.get_prefix(prefix).num_tokens,
                "prefill_tokens_per_request": statistics.mean(prefill),
                "tokens_per_s": len(texts) * new / elapsed,
                "seconds": elapsed,
            }
    finally:
        server.stop()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default=str(HERE / "distill" / "prompt.txt"))
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 16, 32], help="prefix lengths P")
    ap.add_argument(
        "--inits",
        nargs="+",
        default=["first", "pool"],
        help="initializations compared at --compare-at; P is swept with the first",
    )
    ap.add_argument("--compare-at", type=int, default=16, help="the P at which the initializations are compared")
    ap.add_argument("--train-inputs", type=int, default=400)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=DistillConfig.lr)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--serve-requests", type=int, default=32)
    ap.add_argument("--serve-new-tokens", type=int, default=32)
    ap.add_argument("--work", default="runs/bench-distill", help="teacher continuations and runs (resumable)")
    ap.add_argument("--output", default=str(RESULTS / "distill.md"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prompt = Path(args.prompt).read_text(encoding="utf-8")

    base, tokenizer = load_base(None, dtype="fp32")
    model = PrefixTunedModel(base, tokenizer)
    job = Distillation(model, tokenizer, prompt, args.max_new_tokens)
    train_src = job.source_ids(_sources("dev", args.train_inputs, 0))
    held_src = job.source_ids(_sources("test", args.heldout, 0))
    _teacher(job, "teacher-train", train_src, work, 16)
    held_cont = _teacher(job, "teacher-heldout", held_src, work, 16)
    held = job.features(held_src, held_cont)
    values = prompt_values(model, job.prompt_ids)

    runs = [(init, args.compare_at) for init in args.inits] + [
        (args.inits[0], p) for p in args.tokens if p != args.compare_at
    ]
    rows = []
    for init, p in runs:
        run_dir = work / f"{init}-{p}"
        if not (run_dir / "prefix.safetensors").is_file():
            run_dir.mkdir(exist_ok=True)
            if not (run_dir / TEACHER_FILE).is_file():
                shutil.copy(work / "teacher-train.jsonl", run_dir / TEACHER_FILE)
            print(f"distill: init {init}, P = {p}", file=sys.stderr, flush=True)
            distill(
                DistillConfig(
                    output=str(run_dir),
                    prompt=prompt,
                    inputs=_sources("dev", args.train_inputs, 0),
                    num_virtual_tokens=p,
                    init=init,
                    max_new_tokens=args.max_new_tokens,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    dtype="fp32",
                    device="cpu",
                    resume=True,  # continues a killed run; a new one starts from the copied teacher continuations
                    progress=True,
                ),
                base=load_base(None, dtype="fp32"),
            )
        name = f"{init}-{p}"
        model.load_prefix(run_dir, name=name)
        start = Prefix(PrefixConfig(num_virtual_tokens=p, reparameterize=False), model.geometry)
        if init != "random":
            start.parts["decoder"].fit(initial_prefix(values, p, init).float())
        model.put_prefix(f"{name}-start", start)
        before = job.evaluate(held, student=f"{name}-start")
        after = job.evaluate(held, student=name)
        print(f"evaluate {name}: agreement {after['agreement']:.3f}, KL {after['kl']:.4f}", file=sys.stderr, flush=True)
        rows.append(
            {
                "init": init,
                "tokens": p,
                "agreement": after["agreement"],
                "kl": after["kl"],
                "exact_match": _exact(job, name, held_src, held_cont, 16),
                "start_agreement": before["agreement"],
                "start_kl": before["kl"],
                "train_seconds": _seconds(run_dir),
            }
        )
        model.remove_prefix(f"{name}-start")

    best = max((r for r in rows if r["tokens"] == args.compare_at), key=lambda r: r["agreement"])
    folder = work / "serve-prefixes"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    model.save_prefix(folder / "prompt-kv", name=TEACHER)
    served = f"{best['init']}-{args.compare_at}"
    model.save_prefix(folder / served, name=served)
    model.add_prefix("one-token", PrefixConfig(num_virtual_tokens=1, reparameterize=False))
    model.save_prefix(folder / "one-token", name="one-token")
    texts = [tokenizer.decode(s[:-1]) for s in held_src[: args.serve_requests]]  # the sources, without <sep>
    for name in list(model.prefix_names()):
        model.remove_prefix(name)
    serving = _serve(
        model,
        tokenizer,
        folder,
        {
            "prompt as text": ("one-token", [prompt + t for t in texts]),
            "prompt as its keys and values": ("prompt-kv", texts),
            f"distilled prefix (P = {args.compare_at})": (served, texts),
        },
        args.serve_new_tokens,
    )
    summary = {
        "benchmark": "distill",
        "model": model.base_name,
        "prompt_tokens": len(job.prompt_ids),
        "train_inputs": len(train_src),
        "heldout_inputs": len(held),
        "steps": args.steps,
        "torch_threads": torch.get_num_threads(),
        **{f"agreement_{r['init']}_{r['tokens']}": round(r["agreement"], 4) for r in rows},
        **{f"kl_{r['init']}_{r['tokens']}": round(r["kl"], 4) for r in rows},
        **{f"exact_match_{r['init']}_{r['tokens']}": round(r["exact_match"], 4) for r in rows},
        "best_init": best["init"],
        **{
            f"serve_{k.split(' (')[0].replace(' ', '_')}_{m}": round(v[m], 2)
            for k, v in serving.items()
            for m in ("prefill_tokens_per_request", "tokens_per_s")
        },
    }
    _write(args, summary, rows, serving)
    print(json.dumps(summary))


def _seconds(run_dir: Path) -> float:
    config = json.loads((run_dir / "prefix_config.json").read_text())
    return config["training"]["distilled"]["seconds"]


def _write(args, summary: dict, rows: list[dict], serving: dict) -> None:
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# bench_distill",
        "",
        f"A {summary['prompt_tokens']}-token few-shot instruction prompt (`benchmarks/distill/prompt.txt`) distilled "
        f"into P virtual tokens on {summary['model']}, fp32, {summary['torch_threads']} threads: "
        f"{summary['train_inputs']} E2E dev inputs, {summary['steps']} steps of {args.batch_size}, lr {args.lr}; "
        f"scored on {summary['heldout_inputs']} held-out E2E test inputs along the teacher's greedy continuations "
        f"(up to {args.max_new_tokens} tokens).",
        "",
        "| init | P | greedy-token agreement | KL / token | exact match | at step 0: agreement | at step 0: KL | "
        "training (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["init"], r["tokens"])):
        lines.append(
            f"| {r['init']} | {r['tokens']} | {r['agreement']:.1%} | {r['kl']:.4f} | {r['exact_match']:.1%} | "
            f"{r['start_agreement']:.1%} | {r['start_kl']:.4f} | {r['train_seconds']:.0f} |"
        )
    lines += [
        "",
        f"Serving ({args.serve_requests} concurrent held-out requests, {args.serve_new_tokens} new tokens each, "
        "real HTTP server on loopback):",
        "",
        "| case | prefix tokens | prefill tokens per request | tokens/s |",
        "|---|---|---|---|",
    ]
    for case, r in serving.items():
        lines.append(
            f"| {case} | {r['prefix_tokens']} | {r['prefill_tokens_per_request']:.0f} | {r['tokens_per_s']:.1f} |"
        )
    lines += ["", "```json", json.dumps(summary), "```", ""]
    out.write_text("\n".join(lines), encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "runs": rows, "serving": serving}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for init in sorted({r["init"] for r in rows}):
        points = sorted((r["tokens"], r["agreement"]) for r in rows if r["init"] == init)
        ax.plot(*zip(*points), "o-", label=f"init {init}")
    ax.axhline(0.9, color="grey", linestyle="--", linewidth=1, label="target 90%")
    ax.set_xlabel("prefix length P (virtual tokens)")
    ax.set_ylabel("greedy-token agreement (held-out)")
    ax.set_title(f"{summary['prompt_tokens']}-token prompt distilled")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)


if __name__ == "__main__":
    main()
