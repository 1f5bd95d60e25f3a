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


def add_decoding(group, preset_note: str = "the task's paper setting", exclude: tuple[str, ...] = ()) -> None:
    """Every decoding option as a flag (made from :class:`prefixtune.GenerationOptions`)."""
    from ..options import add_flags

    add_flags(group, preset_note, exclude)


def decoding_options(args, base: dict):
    """The preset/task decoding settings, overridden by the flags given: a GenerationOptions."""
    from ..options import from_flags

    return from_flags(args, base)


def add_device(p) -> None:
    """``--device`` and ``--dtype`` with automatic choices."""
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto = cuda when available, else cpu)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="dtype of the frozen model (default: auto = bf16 on GPUs that support it and on CPUs that multiply "
        "bf16 clearly faster than fp32, measured once per machine; else fp32)",
    )


def add_decode_weights(p) -> None:
    """``--decode-weights``: the weights of the lean pass over prompts and decoding steps (:mod:`prefixtune.lean`)."""
    p.add_argument(
        "--decode-weights",
        default="auto",
        choices=["auto", "packed", "plain", "off"],
        help="prompts and decoding steps of Llama-family models: packed = stacked and oneDNN-blocked copies of the "
        "weights (faster for several rows; about 1.5x the weights' memory more), plain = the model's own weights, "
        "off = transformers' forward (default: auto = packed on CPU where the copies fit in a quarter of memory)",
    )


def dtype_note(args) -> str:
    """The model's dtype as the user should read it: ``bf16 (--dtype auto: this CPU has ...)``."""
    from ..distributed import dtype_note as note
    from ..distributed import resolve_device

    return note(args.dtype, resolve_device(args.device))


def device_and_dtype(args) -> tuple[str, str]:
    """The resolved ``--device`` and ``--dtype``: e.g. ("cuda:0", "bf16") or ("cpu", "fp32")."""
    from ..distributed import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return str(device), resolve_dtype(args.dtype, device)
