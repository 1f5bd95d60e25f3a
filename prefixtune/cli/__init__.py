"""The ``prefixtune`` command: a thin shell over the library.

prefixtune train      train a prefix on a frozen model
prefixtune distill    compress a long prompt into a short prefix
prefixtune generate   decode with a trained prefix
prefixtune evaluate   score predictions with the task's official metrics
prefixtune export     write an ejected prefix folder from a run's checkpoint
prefixtune inspect    show a prefix folder's config, size and base model
prefixtune import-peft / export-peft   move prefixes between PEFT and prefixtune
prefixtune data       download the paper's data sets
"""

from __future__ import annotations

import argparse
import sys

from ..errors import PrefixTuneError
from . import datasets, distill, evaluate, generate, prefixes, serve, train


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="prefixtune",
        description="Prefix-Tuning (Li & Liang, ACL 2021) for frozen Hugging Face models.",
    )
    parser.add_argument("--version", action="version", version=f"prefixtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, distill, generate, evaluate, serve, prefixes, datasets):
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to relaunch the same command (train --nproc)
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
