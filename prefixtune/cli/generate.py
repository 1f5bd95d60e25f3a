"""``prefixtune generate``: decode sources with a trained prefix."""

from __future__ import annotations

import sys
from pathlib import Path

from ..data import SPLITS, TASKS
from ..errors import PrefixTuneError
from ..presets import PRESETS
from .common import (
    add_decode_weights,
    add_decoding,
    add_device,
    cache_dir,
    data_path,
    decoding_options,
    device_and_dtype,
    dtype_note,
    positive,
)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="decode with a trained prefix",
        description="Generate outputs for sources read from --input (one per line), stdin, or a data split "
        "(--task e2e --split test: one output per unique source, in order of first appearance, as "
        "`prefixtune evaluate` expects).",
    )
    p.add_argument("--prefix", required=True, help="prefix folder or run directory")
    p.add_argument("--model", default=None, help="base model (default: the one the prefix was trained on)")
    p.add_argument("--input", default=None, help="file with one source per line (default: stdin)")
    p.add_argument("--task", default=None, choices=TASKS, help="read the sources of a data split instead")
    p.add_argument("--data", default=None, help="data file or folder, with --task (default: $PREFIXTUNE_DATA/<task>)")
    p.add_argument("--split", default="test", choices=SPLITS, help="split, with --task (default: test)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="take the preset's decoding settings")
    p.add_argument("--output", default=None, help="write outputs here, one per line (default: stdout)")
    p.add_argument("--batch-size", type=positive(int), default=8, help="sources decoded together (default: 8)")
    p.add_argument("--truncate", action="store_true", help="cut sources longer than the context instead of failing")
    add_device(p)
    add_decode_weights(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_decoding(p.add_argument_group("decoding"), "the preset's")
    p.set_defaults(func=run)


def sources(args) -> list[str]:
    if args.task:
        from ..data import group_references, load_examples

        return [s for s, _ in group_references(load_examples(args.task, data_path(args.data, args.task), args.split))]
    from ..formats import read_text

    text = read_text(Path(args.input)) if args.input else sys.stdin.read()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise PrefixTuneError(f"{args.input or 'stdin'}: no input lines")
    return lines


def run(args) -> int:
    from ..decode import decode_texts, load_for_inference
    from ..files import lines_text, write_lines
    from ..presets import decoding_for

    texts = sources(args)
    device, dtype = device_and_dtype(args)
    model, tokenizer, name = load_for_inference(args.prefix, args.model, dtype, device, cache_dir())
    model.decode_weights = args.decode_weights
    if not args.no_progress:
        print(f"generate: {len(texts):,} inputs, model in {dtype_note(args)}", file=sys.stderr)
    base = decoding_for(args.task, args.preset) if args.preset else {}
    options = decoding_options(args, base)
    outputs = decode_texts(
        model,
        tokenizer,
        texts,
        name,
        args.batch_size,
        options,
        truncate=args.truncate,
        progress=not args.no_progress,
    )
    if args.output:
        write_lines(Path(args.output), outputs)
    else:
        sys.stdout.write(lines_text(outputs))
    return 0
