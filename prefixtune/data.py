"""Tasks, splits and where their files are: E2E, WebNLG 2017, DART, XSUM-style and generic JSONL.

``load_examples(task, data, split)`` reads a file, or finds the split's file inside a folder laid
out as the official release. ``group_references`` turns examples into one (source, references)
item per unique source, in order of first appearance: the unit of decoding and evaluation.
"""

from __future__ import annotations

import random
from pathlib import Path

from .errors import PrefixTuneError
from .formats import (
    Example,
    read_dart_json,
    read_e2e,
    read_jsonl,
    read_line_pairs,
    read_text,
    read_triples_xml,
    read_webnlg_json,
)

TASKS = ("jsonl", "e2e", "webnlg", "dart", "xsum")
SPLITS = ("train", "dev", "test", "test_seen", "test_unseen")
# The folder each task has under a data root such as PREFIXTUNE_DATA or ../shared/data.
TASK_DIRS = {"e2e": "e2e", "webnlg": "webnlg2017", "dart": "dart", "xsum": "xsum", "jsonl": "jsonl"}
# WebNLG 2017: the 10 categories seen in training; the test set's other 5 are "unseen".
WEBNLG_SEEN = frozenset(
    {
        "Airport",
        "Astronaut",
        "Building",
        "City",
        "ComicsCharacter",
        "Food",
        "Monument",
        "SportsTeam",
        "University",
        "WrittenWork",
    }
)
_E2E = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
_WEBNLG_TEST = {
    "test": "testdata_with_lex.xml",
    "test_seen": "testdata_with_lex.xml",
    "test_unseen": "testdata_unseen_with_lex.xml",
}
_DART = {"train": "dart-v1.1.1-full-train", "dev": "dart-v1.1.1-full-dev", "test": "dart-v1.1.1-full-test"}


def data_root_for(task: str, root: str | Path) -> Path:
    """The task's folder under a data root (``root/e2e``, ``root/webnlg2017``, ...)."""
    return Path(root) / TASK_DIRS[task]


def _first_existing(candidates: list[Path], what: str) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise PrefixTuneError(f"{what}: not found (looked for {', '.join(str(p) for p in candidates)})")


def split_files(task: str, folder: Path, split: str) -> list[Path]:
    """The files holding ``split`` of ``task`` inside a release folder."""
    if task == "e2e":
        return [_first_existing([folder / _E2E.get(split, f"{split}.csv")], f"{folder}: E2E {split} split")]
    if task == "webnlg":
        if split in _WEBNLG_TEST:
            return [
                _first_existing(
                    [folder / "test" / _WEBNLG_TEST[split], folder / _WEBNLG_TEST[split]],
                    f"{folder}: WebNLG {split} split",
                )
            ]
        files = sorted((folder / split).glob("**/*.xml"))
        return files or [_first_existing([folder / f"{split}.json"], f"{folder}: WebNLG {split} split")]
    if task == "dart":
        stem = _DART.get(split, split)
        names = [f"{stem}.json", f"{stem}.xml"]
        candidates = [d / n for d in (folder, folder / "v1.1.1", folder / "data" / "v1.1.1") for n in names]
        return [_first_existing(candidates, f"{folder}: DART {split} split")]
    if task == "xsum":
        if (folder / f"{split}.source").exists():
            return [folder / f"{split}.source", folder / f"{split}.target"]
        return [_first_existing([folder / f"{split}.jsonl"], f"{folder}: {split}.source/.target or {split}.jsonl")]
    return [_first_existing([folder / f"{split}.jsonl"], f"{folder}: {split}.jsonl")]


def read_file(task: str, path: Path) -> list[Example]:
    """Read one file of ``task`` by its format."""
    suffix = path.suffix.lower()
    if task == "e2e" and suffix != ".jsonl":
        return read_e2e(path)
    if task in ("webnlg", "dart") and suffix == ".xml":
        return read_triples_xml(path)
    if task == "webnlg" and suffix == ".json":
        return read_webnlg_json(path)
    if task == "dart" and suffix == ".json":
        return read_dart_json(path)
    if task == "xsum" and suffix in (".source", ".target"):
        stem = path.with_suffix("")
        return read_line_pairs(stem.with_suffix(".source"), stem.with_suffix(".target"))
    return read_jsonl(path)


def load_examples(task: str, data: str | Path, split: str = "train") -> list[Example]:
    """Read the examples of ``split`` for ``task`` from a file or a release folder.

    Raises:
        PrefixTuneError: Unknown task or split, missing or malformed files, no examples.
    """
    if task not in TASKS:
        raise PrefixTuneError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if split not in SPLITS:
        raise PrefixTuneError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = Path(data)
    if path.is_dir():
        files = split_files(task, path, split)
        if task == "xsum" and files[0].suffix == ".source":
            files = files[:1]
    else:
        files = [path]
    examples = [e for f in files for e in read_file(task, f)]
    if task == "webnlg" and split in ("test_seen", "test_unseen") and path.is_dir():
        keep = (lambda c: c in WEBNLG_SEEN) if split == "test_seen" else (lambda c: c not in WEBNLG_SEEN)
        examples = [e for e in examples if keep(e.category)]
    if not examples:
        raise PrefixTuneError(f"{path}: no {split} examples")
    return examples


def group_references(examples: list[Example]) -> list[tuple[str, list[str]]]:
    """One (source, references) item per unique source, in order of first appearance."""
    grouped: dict[str, list[str]] = {}
    for e in examples:
        refs = grouped.setdefault(e.source, [])
        if e.target:
            refs.append(e.target)
    return list(grouped.items())


def subset(examples: list[Example], size: int | None, seed: int = 0) -> list[Example]:
    """A reproducible random subset of ``size`` examples (all when ``size`` is None)."""
    if size is None:
        return examples
    if size <= 0 or size > len(examples):
        raise PrefixTuneError(f"--train-size {size} must be between 1 and {len(examples)}")
    chosen = sorted(random.Random(seed).sample(range(len(examples)), size))
    return [examples[i] for i in chosen]


__all__ = ["Example", "TASKS", "group_references", "load_examples", "read_text", "subset"]
