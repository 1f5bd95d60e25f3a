"""Task metrics equal to the official scorers (E2E, WebNLG 2017, DART) and ROUGE for summarization.

``evaluate(task, references, predictions)`` returns lowercase keys with fractions, as the E2E
scorer prints them: ``bleu, nist, meteor, rouge_l, cider`` (E2E), ``bleu, meteor, ter``
(WebNLG/DART), ``rouge1, rouge2, rougeL`` (summarization and generic JSONL).
"""

from __future__ import annotations

from ..errors import PrefixTuneError

METRICS = {
    "e2e": ("bleu", "nist", "meteor", "rouge_l", "cider"),
    "webnlg": ("bleu", "meteor", "ter"),
    "dart": ("bleu", "meteor", "ter"),
    "xsum": ("rouge1", "rouge2", "rougeL"),
    "jsonl": ("rouge1", "rouge2", "rougeL"),
}


def rouge(references: list[list[str]], hypotheses: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 with Porter stemming (``rouge-score``); the best reference per item."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {k: 0.0 for k in ("rouge1", "rouge2", "rougeL")}
    for refs, hyp in zip(references, hypotheses):
        scores = scorer.score_multi(refs, hyp)
        for k in totals:
            totals[k] += scores[k].fmeasure
    return {k: v / len(hypotheses) for k, v in totals.items()}


def evaluate(task: str, references: list[list[str]], predictions: list[str]) -> dict[str, float]:
    """All of a task's metrics.

    Args:
        task: ``e2e``, ``webnlg``, ``dart``, ``xsum`` or ``jsonl``.
        references: Per unique source, its references.
        predictions: One output per unique source, in the same order.
    """
    if task not in METRICS:
        raise PrefixTuneError(f"unknown task {task!r}; choose one of {', '.join(METRICS)}")
    if len(references) != len(predictions):
        raise PrefixTuneError(f"{len(predictions)} predictions for {len(references)} unique sources")
    if not predictions:
        raise PrefixTuneError("no predictions to evaluate")
    empty = [i for i, refs in enumerate(references) if not refs]
    if empty:
        raise PrefixTuneError(f"source {empty[0] + 1} has no reference; cannot evaluate")
    if task == "e2e":
        from .coco import coco_scores
        from .mteval import bleu_nist

        return {**bleu_nist(references, predictions), **coco_scores(references, predictions)}
    if task in ("webnlg", "dart"):
        from .webnlg import webnlg_scores

        return webnlg_scores(references, predictions, transliterate=task == "webnlg")
    return rouge(references, predictions)
