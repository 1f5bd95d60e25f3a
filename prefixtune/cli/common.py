"""Helpers shared by the commands: argument types, the data root and the model cache."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..data import data_root_for
from ..errors import PrefixTuneError


def positive(kind):
    """An argparse type: a number > 0."""

    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def cache_dir() -> Path | None:
    """PREFIXTUNE_CACHE: where the converted default model is kept (default ~/.cache/prefixtune)."""
    return Path(os.environ["PREFIXTUNE_CACHE"]) if os.environ.get("PREFIXTUNE_CACHE") else None


def data_path(data: str | None, task: str) -> str:
    """``--data``, else the task's folder under PREFIXTUNE_DATA."""
    if data:
        return data
    root = os.environ.get("PREFIXTUNE_DATA")
    if root:
        return str(data_root_for(task, root))
    raise PrefixTuneError("--data is required (or set PREFIXTUNE_DATA to a folder holding e2e/, webnlg2017/, dart/)")


def add_decoding(d, defaults_from: str = "the task's paper setting") -> None:
    """Decoding flags on a parser or group; None means: take the preset's / task's value."""
    d.add_argument("--num-beams", type=positive(int), default=None, help=f"beam width (default: {defaults_from})")
    d.add_argument(
        "--max-new-tokens", type=positive(int), default=None, help=f"most new tokens (default: {defaults_from})"
    )
    d.add_argument("--min-new-tokens", type=int, default=0, help="forbid EOS before this many tokens (default: 0)")
    d.add_argument(
        "--length-penalty", type=float, default=None, help=f"beam score / length**p (default: {defaults_from})"
    )
    d.add_argument(
        "--no-repeat-ngram-size", type=int, default=0, help="forbid repeated n-grams of this size (default: off)"
    )


def decoding_options(args, base: dict) -> dict:
    """The preset/task decoding settings, overridden by the flags given."""
    options = dict(base)
    for name in ("num_beams", "max_new_tokens", "length_penalty"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    options["min_new_tokens"] = args.min_new_tokens
    options["no_repeat_ngram_size"] = args.no_repeat_ngram_size
    return options


def add_device(p) -> None:
    """``--device`` and ``--dtype`` with automatic choices."""
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto = cuda when available, else cpu)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="dtype of the frozen model (default: auto = bf16 on GPUs that support it, else fp32)",
    )


def device_and_dtype(args) -> tuple[str, str]:
    """The resolved ``--device`` and ``--dtype``: e.g. ("cuda:0", "bf16") or ("cpu", "fp32")."""
    from ..distributed import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return str(device), resolve_dtype(args.dtype, device)
