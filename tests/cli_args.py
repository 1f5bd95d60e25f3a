"""Command lines for `prefixtune train` on a tiny model and the E2E data, shared by the CLI tests."""

from __future__ import annotations

import sys

from paths import E2E


def train_args(model_dir, output, *extra, **options) -> list[str]:
    """``train`` arguments: keyword options become flags (``train_size=8`` → ``--train-size 8``)."""
    args = ["train", "--model", str(model_dir), "--task", "e2e", "--data", str(E2E)]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return [*args, "--no-progress", "--output", str(output), *extra]


def train_command(model_dir, output, *extra, **options) -> list[str]:
    """The same as a subprocess command line: ``python -m prefixtune train ...``."""
    return [sys.executable, "-m", "prefixtune", *train_args(model_dir, output, *extra, **options)]
