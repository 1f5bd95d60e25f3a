"""The ``prefixtune`` command: a thin shell over the library.

prefixtune train     train a prefix on a frozen model
prefixtune generate  decode with a trained prefix
prefixtune export    write an ejected prefix folder from a run's checkpoint
prefixtune inspect   show a prefix folder's config, size and base model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .data import TASKS
from .errors import PrefixTuneError


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a prefix on a frozen model",
        description="Train a prefix (Li & Liang 2021) "
        "on a frozen Hugging Face model. Only the prefix trains; the run directory gets the final prefix "
        "(prefix.safetensors + prefix_config.json), log.jsonl, loss.png and checkpoints/.",
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model", default=None, help="Hugging Face model id or local folder (default: SmolLM2-135M-Instruct, offline)"
    )
    g.add_argument("--task", default="jsonl", choices=TASKS, help="data format (default: jsonl)")
    g.add_argument(
        "--data",
        required=True,
        help="data file, or folder (e2e: trainset.csv/devset.csv; jsonl: train.jsonl/dev.jsonl)",
    )
    g.add_argument("--dev-data", default=None, help="dev file (default: the dev split in the --data folder, if any)")
    g.add_argument(
        "--train-size", type=_positive(int), default=None, help="train on a reproducible random subset of N examples"
    )
    g.add_argument("--subset-seed", type=int, default=0, help="seed of the --train-size subset (default: 0)")
    g.add_argument("--dev-size", type=_positive(int), default=None, help="use only the first N dev examples")
    g.add_argument("--output", required=True, help="run directory to create")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    g.add_argument(
        "--truncate", action="store_true", help="cut sources longer than the model's context instead of failing"
    )
    s = p.add_argument_group("schedule")
    s.add_argument("--epochs", type=_positive(int), default=5, help="passes over the training data (default: 5)")
    s.add_argument(
        "--max-steps", type=_positive(int), default=None, help="stop after N optimizer steps (overrides --epochs)"
    )
    s.add_argument("--batch-size", type=_positive(int), default=8, help="examples per optimizer step (default: 8)")
    s.add_argument(
        "--grad-accum", type=_positive(int), default=1, help="micro-batches per step, to save memory (default: 1)"
    )
    s.add_argument("--lr", type=_positive(float), default=5e-5, help="peak learning rate of AdamW (default: 5e-5)")
    s.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps before linear decay (default: 0)")
    s.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    s.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="gradient clipping norm, 0 to disable (default: 1.0)"
    )
    s.add_argument("--seed", type=int, default=42, help="seed of initialization and data order (default: 42)")
    s.add_argument("--checkpoint-every", type=_positive(int), default=50, help="checkpoint every N steps (default: 50)")
    s.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the frozen model (default: fp32)"
    )
    s.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    x = p.add_argument_group("prefix")
    x.add_argument(
        "--num-virtual-tokens",
        type=_positive(int),
        default=None,
        help="prefix length P (default: the token count of --init-text, else 10)",
    )
    x.add_argument(
        "--init-text",
        default=None,
        help='initialize from the model\'s activations of real words, e.g. "table-to-text:"',
    )
    x.add_argument(
        "--mode",
        default="kv",
        choices=["kv", "embedding"],
        help="kv: keys/values at every layer (prefix-tuning); embedding: input embeddings only (default: kv)",
    )
    x.add_argument(
        "--no-reparameterize", action="store_true", help="train the prefix directly instead of through the MLP"
    )
    x.add_argument(
        "--mid-dim", type=_positive(int), default=512, help="hidden width of the reparameterization MLP (default: 512)"
    )
    x.add_argument("--dropout", type=float, default=0.0, help="dropout on the prefix while training (default: 0)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from .config import PrefixConfig
    from .training import TrainConfig, train

    prefix = PrefixConfig(
        num_virtual_tokens=args.num_virtual_tokens,
        mode=args.mode,
        reparameterize=not args.no_reparameterize,
        mid_dim=args.mid_dim,
        init_text=args.init_text,
        dropout=args.dropout,
    )
    cfg = TrainConfig(
        output=args.output,
        data=args.data,
        task=args.task,
        model=args.model,
        dev_data=args.dev_data,
        train_size=args.train_size,
        subset_seed=args.subset_seed,
        dev_size=args.dev_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        truncate=args.truncate,
        resume=args.resume,
        progress=not args.no_progress,
        cache_dir=_cache_dir(),
        prefix=prefix,
    )
    result = train(cfg)
    best = f", best dev loss {result.best_dev_loss:.4f}" if result.best_dev_loss is not None else ""
    print(
        f"trained {result.steps} steps, final loss {result.final_loss:.4f}{best}; prefix in {result.output}",
        file=sys.stderr,
    )
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="decode with a trained prefix",
        description="Generate outputs for sources read "
        "from --input (one per line), stdin, or a data split (--task e2e --data ... --split test, one output "
        "per unique source in order of first appearance).",
    )
    p.add_argument("--prefix", required=True, help="prefix folder or run directory")
    p.add_argument("--model", default=None, help="base model (default: the one the prefix was trained on)")
    p.add_argument("--input", default=None, help="file with one source per line (default: stdin)")
    p.add_argument("--task", default=None, choices=TASKS, help="read sources from a data split instead")
    p.add_argument("--data", default=None, help="data file or folder, with --task")
    p.add_argument(
        "--split", default="test", choices=["train", "dev", "test"], help="split, with --task (default: test)"
    )
    p.add_argument("--output", default=None, help="write outputs here, one per line (default: stdout)")
    p.add_argument("--batch-size", type=_positive(int), default=8, help="sources decoded together (default: 8)")
    p.add_argument(
        "--num-beams", type=_positive(int), default=1, help="beam width (the paper uses 5; default: 1 = greedy)"
    )
    p.add_argument("--max-new-tokens", type=_positive(int), default=64, help="most new tokens per output (default: 64)")
    p.add_argument("--min-new-tokens", type=int, default=0, help="forbid EOS before this many tokens (default: 0)")
    p.add_argument(
        "--length-penalty", type=float, default=1.0, help="beam score = logprob / length**penalty (default: 1.0)"
    )
    p.add_argument(
        "--no-repeat-ngram-size", type=int, default=0, help="forbid repeated n-grams of this size (default: off)"
    )
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam search")
    p.add_argument("--temperature", type=_positive(float), default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-p", type=_positive(float), default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default: 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling (default: 0)")
    p.add_argument(
        "--truncate", action="store_true", help="cut sources longer than the model's context instead of failing"
    )
    p.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the frozen model (default: fp32)"
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=cmd_generate)


def _sources(args) -> list[str]:
    if args.task:
        if not args.data:
            raise PrefixTuneError("--task needs --data")
        from .data import load_examples

        return list(dict.fromkeys(e.source for e in load_examples(args.task, args.data, args.split)))
    if args.input:
        from .data import read_text

        text = read_text(Path(args.input))
    else:
        text = sys.stdin.read()
    sources = [line for line in text.splitlines() if line.strip()]
    if not sources:
        raise PrefixTuneError(f"{args.input or 'stdin'}: no input lines")
    return sources


def cmd_generate(args) -> int:
    from .decode import decode_texts, load_for_inference
    from .files import atomic_write

    sources = _sources(args)
    model, tokenizer, name = load_for_inference(args.prefix, args.model, args.dtype, args.device, _cache_dir())
    options = dict(
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
    )
    outputs = decode_texts(
        model,
        tokenizer,
        sources,
        name,
        args.batch_size,
        options,
        seed=args.seed,
        truncate=args.truncate,
        progress=not args.no_progress,
    )
    text = "".join(o.replace("\n", " ") + "\n" for o in outputs)
    if args.output:
        atomic_write(Path(args.output), lambda p: p.write_text(text, encoding="utf-8"))
    else:
        sys.stdout.write(text)
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="eject the MLP: write a flat prefix folder from a run's last checkpoint",
        description="Write the prefix of a run's last checkpoint (or of a prefix folder) as an ejected "
        "prefix folder: the MLP reparameterization is replaced by the flat keys/values it produces.",
    )
    p.add_argument("run", help="run directory (uses checkpoints/checkpoint.pt when present) or prefix folder")
    p.add_argument("output", help="prefix folder to write")
    p.add_argument("--model", default=None, help="base model (default: the one the run used)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .decode import export_run

    path = export_run(args.run, args.output, args.model, _cache_dir())
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="show a prefix folder: config, parameters, size, base model",
        description="Show a saved prefix without loading any model.",
    )
    p.add_argument("path", help="prefix folder or run directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    from .files import CONFIG, WEIGHTS, read_prefix_config, read_prefix_tensors

    path = Path(args.path)
    doc = read_prefix_config(path)
    tensors = read_prefix_tensors(path, doc)
    info = {
        "path": str(path),
        "base_model": doc["base_model"]["name"],
        "base_fingerprint": doc["base_model"]["fingerprint"],
        "model_type": doc["base_model"].get("model_type"),
        "mode": doc.get("mode"),
        "num_virtual_tokens": doc["num_virtual_tokens"],
        "parts": doc["parts"],
        "parameters": sum(t.numel() for t in tensors.values()),
        "file_bytes": (path / WEIGHTS).stat().st_size + (path / CONFIG).stat().st_size,
        "training": doc.get("training", {}),
    }
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def _cache_dir() -> Path | None:
    """PREFIXTUNE_CACHE: where the converted default model is kept (default ~/.cache/prefixtune)."""
    return Path(os.environ["PREFIXTUNE_CACHE"]) if os.environ.get("PREFIXTUNE_CACHE") else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixtune",
        description="Prefix-Tuning (Li & Liang, ACL 2021) for frozen "
        "Hugging Face models: train, generate, export, inspect.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"prefixtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_train, _add_generate, _add_export, _add_inspect):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is happening
    try:
        return args.func(args)
    except PrefixTuneError as e:
        print(f"prefixtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefixtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
