"""What PyTorch's kernels allow on this machine: the issue-17 targets against measured ceilings.

Each ceiling times only work that no implementation of the same computation can skip, with the kernels prefixtune
uses, on the default model's shapes (random weights of its config; nothing is loaded):

- batch-1 decoding: the step's matrix-vector products alone (every weight read once) against the bandwidth floor
  (weight bytes ÷ copy bandwidth), as ``bench_decode.py`` measures it;
- ``--rows``-row decoding: the step's products on oneDNN's blocked copies (prefixtune's fastest at that row count)
  plus attention over a cache of ``--cache-len`` positions, against the FLOP floor (2 × parameters per token ÷ the
  matmul rate);
- training (a frozen base): per layer the forward products, the input-gradient products and attention forward and
  backward over ``--batch`` × ``--length`` tokens after a ``--prefix-len`` prefix, plus the output layer on the
  ``--target-share`` of positions that predict a target; against the FLOP bound of ``bench_train.py`` (4 ×
  parameters per token ÷ the 1024² matmul rate).

Norms, rotary embeddings, activations, softmax over the vocabulary, the optimizer and Python are left out, so a
real run is slower than its ceiling: where a ceiling is already below a target, no code around these kernels can
reach the target on this machine. Prints one JSON line and writes benchmarks/results/ceilings.md.

    python benchmarks/bench_ceilings.py [--rows 64] [--cache-len 80] [--batch 8] [--length 60]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import copy_bandwidth, matmul_rate, timed

HERE = Path(__file__).resolve().parent


def _config(model: str | None):
    from transformers import AutoConfig

    from prefixtune.base import convert_default_model

    return AutoConfig.from_pretrained(model or str(convert_default_model()))


class Shapes:
    """The default model's products, as (out, in) pairs, and its attention geometry."""

    def __init__(self, config) -> None:
        self.layers, self.width = config.num_hidden_layers, config.hidden_size
        self.heads, self.kv = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.width // self.heads
        self.vocab, inter = config.vocab_size, config.intermediate_size
        qkv = (self.heads + 2 * self.kv) * self.head_dim
        self.layer = [(qkv, self.width), (self.width, self.heads * self.head_dim), (2 * inter, self.width)]
        self.layer.append((self.width, inter))
        self.params = self.layers * (sum(n * k for n, k in self.layer) + 2 * self.width) + self.width
        self.params += self.vocab * self.width  # the embedding, read whole as the output layer where tied
        if not getattr(config, "tie_word_embeddings", True):
            self.params += self.vocab * self.width  # a separate output layer


def _best(fn, repeats: int) -> float:
    fn()
    return min(timed(fn) for _ in range(repeats))


def decode_products(shapes: Shapes, rows: int, packed: bool, repeats: int, mkl: bool = False) -> float:
    """Seconds of one decoding step's products for ``rows`` rows (lean.Linear: blocked copies when ``packed``).
    ``mkl``: the layers' products on MKL's packed copies made for exactly ``rows`` rows instead (faster at that
    row count, plain at any other; not what prefixtune runs), the output layer on the blocked copy."""
    from prefixtune.lean import Linear

    linears = [
        Linear(torch.randn(n, k), pack=packed and not mkl) for _ in range(shapes.layers) for n, k in shapes.layer
    ]
    calls = [m if not mkl else _mkl(m.weight, rows) for m in linears]
    calls.append(Linear(torch.randn(shapes.vocab, shapes.width), pack=packed))
    inputs = {k: torch.randn(rows, k) for _, k in [*shapes.layer, (0, shapes.width)]}
    widths = [m.weight.shape[1] for m in linears] + [shapes.width]

    def step():
        for call, width in zip(calls, widths):
            call(inputs[width])

    return _best(step, repeats)


def _mkl(weight: torch.Tensor, rows: int):
    packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    return lambda x: torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)


def decode_attention(shapes: Shapes, rows: int, cache_len: int, repeats: int) -> float:
    """Seconds of one step's attention for ``rows`` rows over ``cache_len`` cached keys (queries grouped per key
    head, as the lean step does), every layer."""
    group = shapes.heads // shapes.kv
    q = torch.randn(rows, shapes.kv, group, shapes.head_dim)
    caches = [
        (
            torch.randn(rows, shapes.kv, cache_len, shapes.head_dim),
            torch.randn(rows, shapes.kv, cache_len, shapes.head_dim),
        )
        for _ in range(shapes.layers)
    ]

    def step():
        for k, v in caches:
            F.scaled_dot_product_attention(q, k, v)

    return _best(step, repeats)


def train_layer(shapes: Shapes, batch: int, length: int, prefix: int, repeats: int) -> float:
    """Seconds of one layer's unavoidable training work: forward and input-gradient products over batch × length
    rows, attention forward and backward (the prefix's keys and values needing gradients)."""
    rows = batch * length
    weights = [torch.randn(n, k) for n, k in shapes.layer]
    xs = [torch.randn(rows, k) for _, k in shapes.layer]
    grads = [torch.randn(rows, n) for n, _ in shapes.layer]
    q = torch.randn(batch, shapes.heads, length, shapes.head_dim, requires_grad=True)
    k = torch.randn(batch, shapes.kv, prefix + length, shapes.head_dim, requires_grad=True)
    v = torch.randn(batch, shapes.kv, prefix + length, shapes.head_dim, requires_grad=True)
    mask = torch.ones(length, prefix + length, dtype=torch.bool).tril(prefix)

    def layer():
        for w, x, g in zip(weights, xs, grads):
            F.linear(x, w)
            g @ w
        q.grad = k.grad = v.grad = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        out.backward(torch.ones_like(out))

    return _best(layer, repeats)


def train_head(shapes: Shapes, targets: int, repeats: int) -> float:
    """Seconds of the output layer's forward and input-gradient products on ``targets`` positions."""
    w, x, g = (
        torch.randn(shapes.vocab, shapes.width),
        torch.randn(targets, shapes.width),
        torch.randn(targets, shapes.vocab),
    )

    def head():
        F.linear(x, w)
        g @ w

    return _best(head, repeats)


def _has_mkl() -> bool:
    try:
        torch.ops.mkl._mkl_reorder_linear_weight(torch.zeros(2, 2), 2)
        return True
    except (RuntimeError, AttributeError):
        return False


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder whose config gives the shapes (default model)")
    ap.add_argument("--rows", type=int, default=64, help="rows of the batched decoding ceiling (default: 64)")
    ap.add_argument("--cache-len", type=int, default=80, help="cached positions per row (default: 80)")
    ap.add_argument("--batch", type=int, default=8, help="training batch (default: 8, as bench_train)")
    ap.add_argument("--length", type=int, default=60, help="tokens per training row (default: 60)")
    ap.add_argument("--prefix-len", type=int, default=10, help="prefix positions (default: 10)")
    ap.add_argument("--target-share", type=float, default=0.45, help="share of positions with a target")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads (default: all)")
    ap.add_argument("--repeats", type=int, default=5, help="timings of each part, best kept (default: 5)")
    ap.add_argument("--output", default=str(HERE / "results" / "ceilings.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = Shapes(_config(args.model))
    r = args.repeats
    with torch.inference_mode():
        bandwidth = max(copy_bandwidth(repeats=r), copy_bandwidth(repeats=r))
        rate = max(matmul_rate(repeats=r), matmul_rate(repeats=r))
        gemv = decode_products(shapes, 1, False, r)
        products = decode_products(shapes, args.rows, True, r)
        mkl = decode_products(shapes, args.rows, True, r, mkl=True) if _has_mkl() else None
        attention = decode_attention(shapes, args.rows, args.cache_len, r)
    train_rate = max(matmul_rate(n=1024, repeats=r), matmul_rate(n=1024, repeats=r))
    layer = train_layer(shapes, args.batch, args.length, args.prefix_len, r)
    head = train_head(shapes, round(args.target_share * args.batch * args.length), r)

    bandwidth_floor = shapes.params * 4 / bandwidth
    rows_tps = args.rows / (products + attention)
    flop_floor = rate / (2 * shapes.params)
    bound = train_rate / (4 * shapes.params)
    train_tps = args.batch * args.length / (shapes.layers * layer + head)
    summary = {
        "benchmark": "ceilings",
        "threads": args.threads,
        "parameters": shapes.params,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "matmul_gflop_s": round(rate / 1e9, 1),
        "matmul_1024_gflop_s": round(train_rate / 1e9, 1),
        "batch1_products_ms": round(gemv * 1000, 2),
        "bandwidth_floor_ms_per_token": round(bandwidth_floor * 1000, 2),
        "batch1_ceiling_vs_bandwidth_floor": round(gemv / bandwidth_floor, 3),
        "rows": args.rows,
        "rows_products_ms": round(products * 1000, 1),
        "rows_attention_ms": round(attention * 1000, 1),
        "rows_ceiling_tokens_per_s": round(rows_tps, 1),
        "flop_floor_tokens_per_s": round(flop_floor, 1),
        "rows_ceiling_vs_flop_floor": round(rows_tps / flop_floor, 4),
        **(
            {
                "rows_mkl_products_ms": round(mkl * 1000, 1),
                "rows_mkl_ceiling_vs_flop_floor": round(args.rows / (mkl + attention) / flop_floor, 4),
            }
            if mkl is not None
            else {}
        ),
        "train_layer_ms": round(layer * 1000, 3),
        "train_head_ms": round(head * 1000, 3),
        "train_ceiling_tokens_per_s": round(train_tps, 1),
        "train_flop_bound_tokens_per_s": round(bound, 1),
        "train_ceiling_vs_flop_bound": round(train_tps / bound, 4),
    }
    _write(args, summary)
    print(json.dumps(summary))
    return summary


def _write(args, s: dict) -> None:
    rows = [
        "| issue-17 measure | target | ceiling (unavoidable kernels only) | floor or bound | ceiling ÷ floor |",
        "|---|---|---|---|---|",
        f"| batch-1 greedy, ms/token | ≤ 1.5× floor | {s['batch1_products_ms']} (products) | "
        f"{s['bandwidth_floor_ms_per_token']} ({s['copy_bandwidth_gb_s']} GB/s) | "
        f"{s['batch1_ceiling_vs_bandwidth_floor']}× |",
        f"| {s['rows']}-row greedy, tokens/s | ≥ 0.5 of floor | {s['rows_ceiling_tokens_per_s']} (products "
        f"{s['rows_products_ms']} ms + attention {s['rows_attention_ms']} ms per step) | "
        f"{s['flop_floor_tokens_per_s']} ({s['matmul_gflop_s']} GFLOP/s) | {s['rows_ceiling_vs_flop_floor']} |",
        *(
            [
                f"| {s['rows']}-row greedy, MKL's packed products for exactly {s['rows']} rows | ≥ 0.5 of floor | "
                f"products {s['rows_mkl_products_ms']} ms + attention | as above | "
                f"{s['rows_mkl_ceiling_vs_flop_floor']} |"
            ]
            if "rows_mkl_products_ms" in s
            else []
        ),
        f"| training, tokens/s | ≥ 0.85 of bound | {s['train_ceiling_tokens_per_s']} ({s['train_layer_ms']} ms per "
        f"layer, head {s['train_head_ms']} ms) | {s['train_flop_bound_tokens_per_s']} "
        f"({s['matmul_1024_gflop_s']} GFLOP/s at 1024²) | {s['train_ceiling_vs_flop_bound']} |",
    ]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(s, indent=1) + "\n")
    out.write_text(
        f"# bench_ceilings\n\nThe default model's shapes ({s['parameters']:,} parameters), fp32, {s['threads']} "
        f"threads; each part the best of {args.repeats}. Ceilings time only the products (and attention) a step "
        f"cannot skip, with prefixtune's kernels; a real step adds norms, rotary embeddings, activations, "
        f"softmax, the optimizer and Python. Decoding cache: {args.cache_len} positions per row; training: "
        f"batch {args.batch} × {args.length} tokens after a {args.prefix_len}-token prefix, output layer on "
        f"{args.target_share:.0%} of positions.\n\n" + "\n".join(rows) + "\n"
    )


if __name__ == "__main__":
    main()
