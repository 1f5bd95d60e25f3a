"""E2E scoring cases that reach every branch of the official scorer, built from the E2E dev set.

The official E2E scorer's example has long outputs and a fixed number of references, so it never
triggers NIST's length penalty or BLEU's brevity penalty; these cases do. Each case is (references
per MR, one output per MR). ``tests/data/official_e2e_cases.json`` holds what the official scorer
prints for each (recorded by ``benchmarks/official_scores.py --record-cases``).
"""

from __future__ import annotations

from pathlib import Path

MRS = 24  # MRs per case: enough n-grams for stable information weights, small enough to score in seconds


def _groups(data: Path) -> list[list[str]]:
    from prefixtune.data import group_references, load_examples

    return [refs for _, refs in group_references(load_examples("e2e", data, "dev"))[: MRS + 1]]


def _words(text: str, keep: float) -> str:
    words = text.split()
    return " ".join(words[: max(1, round(len(words) * keep))])


def cases(data: Path) -> dict[str, tuple[list[list[str]], list[str]]]:
    """name -> (references per MR, outputs), deterministic for a given E2E release."""
    groups = _groups(data)
    refs, following = groups[:MRS], groups[1 : MRS + 1]
    return {
        # far shorter than the references: NIST's length penalty and BLEU's brevity penalty both bite
        "short": (refs, [_words(r[0], 0.25) for r in refs]),
        # a little short: the penalty's gentle region (ratio between 0.67 and 1)
        "slightly_short": (refs, [_words(r[0], 0.8) for r in refs]),
        # longer than every reference: no penalty, many unmatched n-grams
        "long": (refs, [f"{r[0]} {r[-1]}" for r in refs]),
        # one reference per MR; the output is another reference of the same MR (or a truncated copy)
        "one_reference": ([r[:1] for r in refs], [r[1] if len(r) > 1 else _words(r[0], 0.6) for r in refs]),
        # 1 to 5 references per MR and outputs that describe the next MR: few matches, uneven counts
        "uneven_references": ([r[: 1 + i % 5] for i, r in enumerate(refs)], [f[0] for f in following]),
        # some outputs empty, some a single word, the rest the last reference
        "empty_and_tiny": (
            refs,
            ["" if i % 4 == 0 else r[0].split()[0] if i % 4 == 1 else r[-1] for i, r in enumerate(refs)],
        ),
        # case, punctuation, prices and ratings the tokenizer must split like the script
        "punctuation": (refs, [f"{r[0].upper()} -- Price: £20-25, rated 5/5 (3.5 out of 5)!" for r in refs]),
    }


def write_official_inputs(references: list[list[str]], outputs: list[str], folder: Path) -> tuple[Path, Path]:
    """The two files the official scorer reads: references in blank-line-separated groups, outputs by line."""
    folder.mkdir(parents=True, exist_ok=True)
    refs, preds = folder / "references.txt", folder / "outputs.txt"
    refs.write_text("\n\n".join("\n".join(group) for group in references) + "\n", encoding="utf-8")
    preds.write_text("\n".join(outputs) + "\n", encoding="utf-8")
    return refs, preds
