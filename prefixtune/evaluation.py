"""Scoring prediction files against reference files, and decoding a split to score a model.

Predictions are one line per unique source, in the order in which sources first appear in the
reference file. DART's official evaluation scores each entry of the release instead (5,097 test
entries; entries with identical triplesets stay apart, each with its own references), so a DART
prediction file may also have one line per entry; one line per unique source is then scored as
that output for each of its entries. Every mismatch is an error naming the file; nothing is
silently realigned.
"""

from __future__ import annotations

from pathlib import Path

from .data import group_references, load_examples
from .errors import PrefixTuneError
from .formats import Example, read_text
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


def official_items(task: str, examples: list[Example]) -> list[tuple[str, list[str]]]:
    """What the task's official scorer scores, as (source, references): DART one per entry of the
    release (identical triplesets kept apart, each with its own references); the other tasks one
    per unique source, in first-appearance order."""
    if task != "dart":
        return group_references(examples)
    entries: dict[str, tuple[str, list[str]]] = {}
    for e in examples:
        refs = entries.setdefault(e.origin, (e.source, []))[1]
        if e.target:
            refs.append(e.target)
    return list(entries.values())


def read_references(task: str, path: str | Path) -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    """A reference file's unique sources and the items its task's scorer scores (see ``official_items``)."""
    path = Path(path)
    if task == "e2e" and path.suffix == ".txt":
        groups = read_conc_references(path)
        return groups, groups
    if task == "xsum" and path.suffix == ".target" and not path.with_suffix(".source").exists():
        groups = [(f"{path}:{i}", [line]) for i, line in enumerate(read_text(path).splitlines(), start=1)]
        return groups, groups
    examples = load_examples(task, path, "test")
    return group_references(examples), official_items(task, examples)


def align_predictions(
    predictions: list[str],
    unique: list[tuple[str, list[str]]],
    items: list[tuple[str, list[str]]],
    where: str = "predictions",
    references: str = "the references",
) -> list[str]:
    """One prediction per scored item, from one per item or one per unique source (as ``generate`` writes).

    Raises:
        PrefixTuneError: Any other count, naming ``where`` (the predictions) and ``references``.
    """
    if len(predictions) == len(items):
        return predictions
    if len(predictions) == len(unique):
        index = {source: i for i, (source, _) in enumerate(unique)}
        return [predictions[index[source]] for source, _ in items]
    per_item = f" or {len(items)} (one per entry, as the official DART evaluation)" if len(items) != len(unique) else ""
    raise PrefixTuneError(
        f"{where}: {len(predictions)} prediction lines, but {references} has {len(unique)} unique sources "
        f"(one line per unique source, in order of first appearance){per_item}"
    )


def evaluate_files(task: str, references: str | Path, predictions: str | Path) -> dict[str, float]:
    """All of ``task``'s metrics for a predictions file against a reference file."""
    unique, items = read_references(task, references)
    missing = next((i for i, (_, refs) in enumerate(items) if not refs), None)
    if missing is not None:
        raise PrefixTuneError(
            f"{references}: source {missing + 1} ({items[missing][0][:60]!r}) has no reference; a reference file "
            "needs its reference column or texts (E2E: mr,ref)"
        )
    lines = [line.strip() for line in read_text(Path(predictions)).splitlines()]
    hypotheses = align_predictions(lines, unique, items, str(predictions), str(references))
    return evaluate(task, [refs for _, refs in items], hypotheses)


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

    examples = load_examples(task, data, split)
    groups = group_references(examples)[:limit]
    sources = [s for s, _ in groups]
    predictions = decode_texts(model, tokenizer, sources, None, batch_size, decoding or {}, progress=progress)
    chosen = set(sources)
    items = [item for item in official_items(task, examples) if item[0] in chosen]
    scored = align_predictions(predictions, groups, items, "decoded predictions", f"{task} {split}")
    return evaluate(task, [refs for _, refs in items], scored), predictions, sources
