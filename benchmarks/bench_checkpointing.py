"""Peak memory of one training step on long sequences, with and without gradient checkpointing.

Each case runs in its own process (peak RSS is per process). Prints one JSON line and writes
benchmarks/results/checkpointing.md.

    python benchmarks/bench_checkpointing.py [--seq-len 512] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def step(args) -> dict:
    from prefixtune import PrefixConfig, PrefixTunedModel, load_base

    base, _ = load_base(args.model)
    torch.manual_seed(0)  # the same prefix in both processes
    model = PrefixTunedModel.wrap(base, PrefixConfig(num_virtual_tokens=10))
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch_size, args.seq_len))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    out = model(ids, labels=ids, loss_only=True)
    out.loss.backward()
    return {
        "seconds": time.perf_counter() - start,
        "loss": float(out.loss),
        "rss_before_mb": before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "grad_norm": float(torch.cat([p.grad.flatten() for p in model.trainable_parameters()]).norm()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--output", default=str(Path(__file__).parent / "results" / "checkpointing.md"))
    args = ap.parse_args()
    if args.child:
        print(json.dumps(step(args)))
        return
    results = {}
    for flag in (False, True):
        cmd = [sys.executable, __file__, "--child", *sys.argv[1:]] + (["--checkpointing"] if flag else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results["checkpointing" if flag else "plain"] = json.loads(out.stdout.strip().splitlines()[-1])
    plain, ckpt = results["plain"], results["checkpointing"]
    summary = {
        "benchmark": "checkpointing",
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "plain_peak_rss_mb": round(plain["peak_rss_mb"]),
        "checkpointing_peak_rss_mb": round(ckpt["peak_rss_mb"]),
        "plain_step_memory_mb": round(plain["peak_rss_mb"] - plain["rss_before_mb"]),
        "checkpointing_step_memory_mb": round(ckpt["peak_rss_mb"] - ckpt["rss_before_mb"]),
        "plain_seconds": round(plain["seconds"], 2),
        "checkpointing_seconds": round(ckpt["seconds"], 2),
        "same_loss": abs(plain["loss"] - ckpt["loss"]) < 1e-5,
        "grad_norm_rel_diff": abs(plain["grad_norm"] - ckpt["grad_norm"]) / plain["grad_norm"],
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(
        f"# bench_checkpointing\n\nOne training step, batch {args.batch_size} × {args.seq_len} tokens, "
        "default model.\n\n"
        "| | peak RSS (MB) | memory of the step (MB) | seconds |\n|---|---|---|---|\n"
        f"| plain | {summary['plain_peak_rss_mb']} | {summary['plain_step_memory_mb']} | {summary['plain_seconds']} |\n"
        f"| gradient checkpointing | {summary['checkpointing_peak_rss_mb']} | "
        f"{summary['checkpointing_step_memory_mb']} | "
        f"{summary['checkpointing_seconds']} |\n"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
