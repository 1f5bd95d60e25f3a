"""``prefixtune train``: train a prefix, optionally with a paper preset and a final dev evaluation."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import PrefixConfig, field_default
from ..data import TASKS
from ..errors import PrefixTuneError
from ..presets import PRESETS, get_preset
from ..training import TrainConfig
from .common import add_decoding, add_device, cache_dir, data_path, decoding_options, positive


def _train(name: str):
    return field_default(TrainConfig, name)


def _prefix(name: str):
    return field_default(PrefixConfig, name)


# Settings a preset can give: used when neither a flag nor the preset sets one (from the config dataclasses).
DEFAULTS = {
    "lr": _train("lr"),
    "epochs": _train("epochs"),
    "batch_size": _train("batch_size"),
    "mid_dim": _prefix("mid_dim"),
    "num_virtual_tokens": _prefix("num_virtual_tokens"),
    "init_text": _prefix("init_text"),
}


def _dev_size(text: str) -> int | None:
    """``--dev-size``: a positive count, or ``all`` for the whole dev split."""
    if text.strip().lower() == "all":
        return None
    return positive(int)(text)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a prefix on a frozen model",
        description="Train a prefix (Li & Liang 2021) on a frozen Hugging Face model. Only the prefix trains; the run "
        "directory gets the final (best on dev) prefix, log.jsonl, loss.png and checkpoints/. A --preset sets the "
        "paper's hyperparameters; flags given explicitly override it.",
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None, help="Hugging Face id or local folder (default: SmolLM2-135M-Instruct)")
    g.add_argument("--task", default=None, choices=TASKS, help="data format (default: the preset's, else jsonl)")
    g.add_argument("--data", default=None, help="data file or release folder (default: $PREFIXTUNE_DATA/<task>)")
    g.add_argument("--dev-data", default=None, help="dev file (default: the dev split of the --data folder, if any)")
    g.add_argument(
        "--train-size", type=positive(int), default=None, help="train on a reproducible subset of N examples"
    )
    g.add_argument(
        "--subset-seed",
        type=int,
        default=_train("subset_seed"),
        help="seed of the --train-size subset (default: %(default)s)",
    )
    g.add_argument(
        "--dev-size",
        type=_dev_size,
        default=_train("dev_size"),
        metavar="N|all",
        help="dev examples (the first N) for the dev loss after every epoch, or 'all' (default: %(default)s)",
    )
    g.add_argument("--output", required=True, help="run directory to create")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    g.add_argument("--truncate", action="store_true", help="cut sources longer than the context instead of failing")
    s = p.add_argument_group("schedule")
    s.add_argument("--preset", default=None, choices=sorted(PRESETS), help="the paper's settings for a task")
    s.add_argument(
        "--epochs",
        type=positive(int),
        default=None,
        help=f"passes over the data (default: preset, else {DEFAULTS['epochs']})",
    )
    s.add_argument(
        "--max-steps", type=positive(int), default=None, help="stop after N optimizer steps (overrides epochs)"
    )
    s.add_argument(
        "--batch-size",
        type=positive(int),
        default=None,
        help=f"examples per step (default: preset, else {DEFAULTS['batch_size']})",
    )
    s.add_argument(
        "--grad-accum",
        type=positive(int),
        default=_train("grad_accum"),
        help="micro-batches per step, saves memory (default: %(default)s)",
    )
    s.add_argument(
        "--lr",
        type=positive(float),
        default=None,
        help=f"peak AdamW learning rate (default: preset, else {DEFAULTS['lr']})",
    )
    s.add_argument(
        "--warmup-steps",
        type=int,
        default=_train("warmup_steps"),
        help="linear warmup steps, then linear decay (default: %(default)s)",
    )
    s.add_argument(
        "--weight-decay", type=float, default=_train("weight_decay"), help="AdamW weight decay (default: %(default)s)"
    )
    s.add_argument(
        "--max-grad-norm",
        type=float,
        default=_train("max_grad_norm"),
        help="gradient clipping norm, 0 disables (default: %(default)s)",
    )
    s.add_argument(
        "--seed", type=int, default=_train("seed"), help="seed of initialization and data order (default: %(default)s)"
    )
    s.add_argument(
        "--checkpoint-every",
        type=positive(int),
        default=_train("checkpoint_every"),
        help="checkpoint every N steps (default: %(default)s)",
    )
    add_device(s)
    d = p.add_argument_group("multi-process (PyTorch distributed)")
    d.add_argument(
        "--nproc",
        type=positive(int),
        default=1,
        help="train with N processes on this machine: runs this command under torchrun --nproc_per_node N "
        "(DDP; gloo on CPU, NCCL on GPU). --batch-size stays the global batch (default: 1)",
    )
    d.add_argument(
        "--fsdp",
        action="store_true",
        help="also shard the frozen base across the processes with FSDP2 fully_shard (bases larger than one device)",
    )
    s.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute layers in the backward pass: less memory, ~30%% more compute (decoder-only)",
    )
    s.add_argument(
        "--group-by-length",
        action="store_true",
        help="batch examples of similar length together: less padding, faster steps (changes the data order)",
    )
    s.add_argument(
        "--compile",
        action="store_true",
        help="compile each layer of the frozen model with torch.compile (one-off compilation first, "
        "~80 s for the default model on 2 CPU cores); meant for GPUs: no gain measured on CPUs",
    )
    s.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    x = p.add_argument_group("prefix")
    x.add_argument(
        "--num-virtual-tokens",
        type=positive(int),
        default=None,
        help="prefix length P (default: preset, else the token count of --init-text, else 10)",
    )
    x.add_argument("--init-text", default=None, help='initialize from real words\' activations, e.g. "table-to-text:"')
    x.add_argument(
        "--mode",
        default=_prefix("mode"),
        choices=["kv", "embedding"],
        help="kv: keys/values at every layer; embedding: input embeddings only (default: %(default)s)",
    )
    x.add_argument("--no-reparameterize", action="store_true", help="train the prefix directly, without the MLP")
    x.add_argument(
        "--mid-dim",
        type=positive(int),
        default=None,
        help=f"MLP hidden width (default: preset, else {DEFAULTS['mid_dim']})",
    )
    x.add_argument(
        "--dropout",
        type=float,
        default=_prefix("dropout"),
        help="dropout on the prefix while training (default: %(default)s)",
    )
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval", action="store_true", help="decode dev at the end and write metrics.json")
    e.add_argument("--eval-size", type=positive(int), default=None, help="decode only the first N unique dev sources")
    e.add_argument("--eval-batch-size", type=positive(int), default=8, help="sources decoded together (default: 8)")
    add_decoding(e, exclude=("seed",))  # --seed is the training seed; evaluation decodes with seed 0
    p.set_defaults(func=run)


def resolve(args) -> dict:
    """Flag > preset > built-in default, for every setting a preset can give."""
    preset = get_preset(args.preset)
    values = {}
    for name, default in DEFAULTS.items():
        explicit = getattr(args, name)
        from_preset = preset.train.get(name, preset.prefix.get(name)) if preset else None
        values[name] = explicit if explicit is not None else from_preset if from_preset is not None else default
    values["task"] = args.task or (preset.task if preset and preset.task else ("e2e" if preset else "jsonl"))
    values["max_steps"] = args.max_steps or (preset.max_steps_for(args.train_size) if preset else None)
    return values


def run(args) -> int:
    import os

    from .. import distributed
    from ..config import PrefixConfig
    from ..presets import decoding_for
    from ..training import TrainConfig, train

    if args.fsdp and args.eval:
        raise PrefixTuneError("--eval is not available with --fsdp: decode afterwards with prefixtune generate")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return distributed.launch(args.nproc, distributed.without_option(args.argv, "--nproc"))
    v = resolve(args)
    prefix = PrefixConfig(
        num_virtual_tokens=v["num_virtual_tokens"],
        mode=args.mode,
        reparameterize=not args.no_reparameterize,
        mid_dim=v["mid_dim"],
        init_text=v["init_text"],
        dropout=args.dropout,
    )
    data = data_path(args.data, v["task"])
    cfg = TrainConfig(
        output=args.output,
        data=data,
        task=v["task"],
        model=args.model,
        dev_data=args.dev_data,
        train_size=args.train_size,
        subset_seed=args.subset_seed,
        dev_size=args.dev_size,
        epochs=v["epochs"],
        max_steps=v["max_steps"],
        batch_size=v["batch_size"],
        grad_accum=args.grad_accum,
        lr=v["lr"],
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
        cache_dir=cache_dir(),
        prefix=prefix,
        gradient_checkpointing=args.gradient_checkpointing,
        fsdp=args.fsdp,
        group_by_length=args.group_by_length,
        compile=args.compile,
    )
    try:
        result = train(cfg)
    finally:
        distributed.shutdown()
    if distributed.from_env().rank != 0:
        return 0  # rank 0 reports and evaluates
    best = ""
    if result.best_dev_loss is not None:
        best = f", best dev loss {result.best_dev_loss:.4f} at step {result.best_step}"
    print(
        f"trained {result.steps} steps, final loss {result.final_loss:.4f}{best}; prefix in {result.output}",
        file=sys.stderr,
    )
    if args.eval:
        options = decoding_options(args, decoding_for(v["task"], args.preset))
        metrics = evaluate_run(result, v["task"], args.dev_data or data, options, args)
        print(json.dumps(metrics), file=sys.stderr)
    return 0


def evaluate_run(result, task: str, data: str, options, args) -> dict:
    """Decode dev with the run's saved (best) prefix; write metrics.json and dev_predictions.txt."""
    from ..evaluation import evaluate_model
    from ..files import write_json, write_lines

    model = result.model
    model.load_prefix(result.output, name="saved")
    model.active = "saved"
    tokenizer = model.tokenizer
    metrics, predictions, _ = evaluate_model(
        model,
        tokenizer,
        task,
        data,
        "dev",
        args.eval_size,
        options,
        args.eval_batch_size,
        progress=not args.no_progress,
    )
    run_dir = Path(result.output)
    write_lines(run_dir / "dev_predictions.txt", predictions)
    report = {"task": task, "split": "dev", "sources": len(predictions), "decoding": options.to_dict(), **metrics}
    write_json(run_dir / "metrics.json", report)
    return report
