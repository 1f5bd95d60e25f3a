"""Training data: generic JSONL and the E2E release, linearized as in the paper (§5.1).

E2E meaning representations ``name[The Vaults], eatType[pub]`` become
``name : The Vaults | eatType : pub``. Every example keeps where it came from (``file:line``)
so that errors name it.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import PrefixTuneError

TASKS = ("jsonl", "e2e")
_E2E_FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
_E2E_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[(.*?)\]\s*(?:,|$)")


@dataclass(frozen=True)
class Example:
    """One (source, target) pair.

    Attributes:
        source: The linearized input text.
        target: One reference text.
        origin: ``file:line`` it was read from.
    """

    source: str
    target: str
    origin: str


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise PrefixTuneError(f"{path}: data file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise PrefixTuneError(f"{path}:{line}: not UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise PrefixTuneError(f"{path}: data file is empty")
    return text


def read_jsonl(path: Path) -> list[Example]:
    """``{"source": ..., "target": ...}`` or ``{"source": ..., "targets": [...]}`` per line."""
    examples = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrefixTuneError(f"{where}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("source"), str):
            raise PrefixTuneError(f"{where}: needs a string field 'source'")
        targets = obj.get("targets", [obj["target"]] if "target" in obj else None)
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise PrefixTuneError(f"{where}: needs a string 'target' or a non-empty list of strings 'targets'")
        examples.extend(Example(obj["source"], t, where) for t in targets)
    return examples


def linearize_e2e(mr: str) -> str:
    """``name[The Vaults], eatType[pub]`` → ``name : The Vaults | eatType : pub``."""
    slots = _E2E_SLOT.findall(mr)
    if not slots:
        raise ValueError(f"not an E2E meaning representation: {mr!r}")
    return " | ".join(f"{key} : {value}" for key, value in slots)


def read_e2e(path: Path) -> list[Example]:
    """An E2E CSV file with header ``mr,ref`` (one row per reference)."""
    reader = csv.reader(_read_text(path).splitlines())
    header = next(reader)
    if [h.strip() for h in header[:2]] != ["mr", "ref"]:
        raise PrefixTuneError(f"{path}:1: expected header 'mr,ref', got {','.join(header)!r}")
    examples = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if len(row) < 2:
            raise PrefixTuneError(f"{where}: expected 2 columns (mr, ref), got {len(row)}")
        try:
            source = linearize_e2e(row[0])
        except ValueError as e:
            raise PrefixTuneError(f"{where}: {e}") from None
        examples.append(Example(source, row[1].strip(), where))
    return examples


def resolve_file(task: str, data: str | Path, split: str) -> Path:
    """The file for ``split`` of ``task``: ``data`` itself, or a file inside the folder ``data``."""
    path = Path(data)
    if not path.is_dir():
        return path
    if task == "e2e":
        return path / _E2E_FILES[split]
    return path / f"{split}.jsonl"


def load_examples(task: str, data: str | Path, split: str = "train") -> list[Example]:
    """Read the examples of ``split`` from ``data`` for ``task`` (``jsonl`` or ``e2e``)."""
    if task not in TASKS:
        raise PrefixTuneError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    path = resolve_file(task, data, split)
    examples = read_e2e(path) if task == "e2e" else read_jsonl(path)
    if not examples:
        raise PrefixTuneError(f"{path}: no examples")
    return examples


def subset(examples: list[Example], size: int | None, seed: int = 0) -> list[Example]:
    """A reproducible random subset of ``size`` examples (all when ``size`` is None)."""
    if size is None:
        return examples
    if size <= 0 or size > len(examples):
        raise PrefixTuneError(f"--train-size {size} must be between 1 and {len(examples)}")
    chosen = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[i] for i in chosen]
