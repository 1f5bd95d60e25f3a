"""``prefixtune evaluate``: score a predictions file with the task's official metrics."""

from __future__ import annotations

import json

from ..metrics import METRICS

NAMES = {
    "bleu": "BLEU",
    "nist": "NIST",
    "meteor": "METEOR",
    "rouge_l": "ROUGE_L",
    "cider": "CIDEr",
    "ter": "TER",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
}


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score predictions with the task's official metrics",
        description="Score predictions (one line per unique source, in order of first appearance in the reference "
        "file) against references. E2E: BLEU, NIST, METEOR, ROUGE_L, CIDEr as the E2E scorer computes them; "
        "WebNLG/DART: BLEU, METEOR, TER as their official evaluation (DART scores each entry of the release, so a "
        "DART file may also have one line per entry, the official layout); xsum/jsonl: ROUGE-1/2/L with stemming. "
        "Scores are fractions (BLEU 0.6925), as the E2E scorer prints them. TER takes minutes on large test sets.",
    )
    p.add_argument("--task", required=True, choices=sorted(METRICS), help="which metrics and reference format")
    p.add_argument(
        "--references",
        required=True,
        help="reference file: the task's data file (E2E CSV or the metrics package's .txt, WebNLG/DART "
        "XML/JSON, .target or JSONL)",
    )
    p.add_argument(
        "--predictions", required=True, help="predictions file, one line per unique source (DART: or per entry)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with lowercase keys")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation import evaluate_files

    scores = evaluate_files(args.task, args.references, args.predictions)
    if args.json:
        print(json.dumps(scores))
        return 0
    width = max(len(NAMES[k]) for k in scores)
    for key, value in scores.items():
        print(f"{NAMES[key]:<{width}}  {value:.4f}")
    return 0
