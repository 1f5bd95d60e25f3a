"""``prefixtune distill``: compress a long prompt into a short learned prefix."""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import field_default
from ..distill import INITS, DistillConfig
from ..errors import PrefixTuneError
from .common import add_device, cache_dir, positive


def _default(name: str):
    return field_default(DistillConfig, name)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="compress a long prompt into a short prefix",
        description="Learn a prefix of P virtual tokens that stands for a long prompt. Teacher: the frozen model with "
        "the prompt's tokens in front of each input; student: the same model with the prefix, initialized from the "
        "prompt's own keys and values. The prefix is trained to match the teacher's next-token distributions (KL) "
        "along the teacher's greedy continuations of the inputs (generated once, cached in the output folder). "
        "Inputs are formatted as `prefixtune generate` and /v1/completions format them, so the output folder is an "
        "ordinary prefix for generate, serve and export-peft.",
    )
    g = p.add_argument_group("prompt and inputs")
    g.add_argument("--prompt", required=True, help="text file holding the prompt the prefix should stand for")
    g.add_argument(
        "--inputs", required=True, help='JSONL file, one {"source": "..."} per line (other fields are ignored)'
    )
    g.add_argument("--output", required=True, help="folder to create: the prefix, teacher.jsonl, log.jsonl, loss.png")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    g.add_argument("--model", default=None, help="Hugging Face id or local folder (default: SmolLM2-135M-Instruct)")
    s = p.add_argument_group("prefix and schedule")
    s.add_argument(
        "--num-virtual-tokens",
        type=positive(int),
        default=_default("num_virtual_tokens"),
        help="prefix length P, at most the prompt's tokens (default: %(default)s)",
    )
    s.add_argument(
        "--init",
        choices=INITS,
        default=_default("init"),
        help="start from the prompt's keys and values: first = at its first P tokens (the best in "
        "benchmarks/results/distill.md), pool = their mean over P contiguous chunks; or random (default: %(default)s)",
    )
    s.add_argument(
        "--max-new-tokens",
        type=positive(int),
        default=_default("max_new_tokens"),
        help="length of the teacher's continuations (default: %(default)s)",
    )
    s.add_argument(
        "--steps", type=positive(int), default=_default("steps"), help="optimizer steps (default: %(default)s)"
    )
    s.add_argument(
        "--batch-size",
        type=positive(int),
        default=_default("batch_size"),
        help="inputs per step (default: %(default)s)",
    )
    s.add_argument(
        "--lr", type=positive(float), default=_default("lr"), help="peak learning rate (default: %(default)s)"
    )
    s.add_argument(
        "--warmup-steps", type=int, default=_default("warmup_steps"), help="linear warmup steps (default: %(default)s)"
    )
    s.add_argument(
        "--reparameterize",
        action="store_true",
        help="train through the paper's MLP (ejected at the end) instead of the flat keys and values",
    )
    s.add_argument("--seed", type=int, default=_default("seed"), help="seed of the data order (default: %(default)s)")
    s.add_argument(
        "--checkpoint-every",
        type=positive(int),
        default=_default("checkpoint_every"),
        help="write a checkpoint every N steps (default: %(default)s)",
    )
    add_device(s)
    s.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..distill import distill

    prompt_file = Path(args.prompt)
    if not prompt_file.is_file():
        raise PrefixTuneError(f"--prompt {prompt_file}: no such file")
    try:
        prompt = prompt_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PrefixTuneError(f"--prompt {prompt_file}: not UTF-8 text") from None
    if not Path(args.inputs).is_file():
        raise PrefixTuneError(f"--inputs {args.inputs}: no such file")
    config = DistillConfig(
        output=args.output,
        prompt=prompt,
        inputs=args.inputs,
        num_virtual_tokens=args.num_virtual_tokens,
        init=args.init,
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        reparameterize=args.reparameterize,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        progress=not args.no_progress,
        cache_dir=str(cache_dir()) if cache_dir() else None,
    )
    result = distill(config)
    print(
        f"distilled a {result.prompt_tokens}-token prompt into {args.num_virtual_tokens} virtual tokens "
        f"({result.steps} steps, final KL {result.final_kl:.4f}): {result.output}",
        file=sys.stderr,
    )
    return 0
