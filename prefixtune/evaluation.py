"""Scoring prediction files against reference files, and decoding a split to score a model.

Predictions are one line per unique source, in the order in which sources first appear in the
reference file. Every mismatch is an error naming the file; nothing is silently realigned.
"""

from __future__ import annotations

from pathlib import Path

from .data import group_references, load_examples
from .errors import PrefixTuneError
from .formats import read_text
from .metrics import evaluate


def read_conc_references(path: Path) -> list[tuple[str, list[str]]]:
    """The E2E metrics package's reference format: one reference per line, a blank line between items."""
    groups: list[list[str]] = [[]]
    for line in read_text(path).splitlines():
        if line.strip():
            groups[-1].append(line.strip())
        elif groups[-1]:
            groups.append([])
    if not groups[-1]:
        groups.pop()
    return [(f"{path}:item {i + 1}", refs) for i, refs in enumerate(groups)]


def read_references(task: str, path: str | Path) -> list[tuple[str, list[str]]]:
    """(source, references) per unique source of a reference file, in first-appearance order."""
    path = Path(path)
    if task == "e2e" and path.suffix == ".txt":
        return read_conc_references(path)
    if task == "xsum" and path.suffix == ".target" and not path.with_suffix(".source").exists():
        return [(f"{path}:{i}", [line]) for i, line in enumerate(read_text(path).splitlines(), start=1)]
    return group_references(load_examples(task, path, "test"))


def read_predictions(path: str | Path, expected: int, references: str | Path) -> list[str]:
    """One prediction per line; the count must equal the number of unique sources."""
    path = Path(path)
    lines = read_text(path).splitlines()
    if len(lines) != expected:
        raise PrefixTuneError(
            f"{path}: {len(lines)} prediction lines, but {references} has {expected} unique sources "
            "(one line per unique source, in order of first appearance)"
        )
    return [line.strip() for line in lines]


def evaluate_files(task: str, references: str | Path, predictions: str | Path) -> dict[str, float]:
    """All of ``task``'s metrics for a predictions file against a reference file."""
    groups = read_references(task, references)
    missing = next((i for i, (_, refs) in enumerate(groups) if not refs), None)
    if missing is not None:
        raise PrefixTuneError(
            f"{references}: source {missing + 1} ({groups[missing][0][:60]!r}) has no reference; a reference file "
            "needs its reference column or texts (E2E: mr,ref)"
        )
    hypotheses = read_predictions(predictions, len(groups), references)
    return evaluate(task, [refs for _, refs in groups], hypotheses)


def evaluate_model(
    model,
    tokenizer,
    task: str,
    data,
    split: str = "dev",
    limit: int | None = None,
    decoding: dict | None = None,
    batch_size: int = 8,
    progress: bool = False,
):
    """Decode the unique sources of a split and score them.

    Returns:
        (metrics, predictions, sources).
    """
    from .decode import decode_texts

    groups = group_references(load_examples(task, data, split))[:limit]
    sources = [s for s, _ in groups]
    predictions = decode_texts(model, tokenizer, sources, None, batch_size, decoding or {}, progress=progress)
    return evaluate(task, [refs for _, refs in groups], predictions), predictions, sources
