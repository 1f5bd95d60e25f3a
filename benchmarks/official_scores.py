"""prefixtune's metrics side by side with the official scorers, on every committed prediction file.

E2E: every E2E test prediction file under ``benchmarks/results/`` is scored by the official E2E NLG
Challenge scorer (``../shared/tools/e2e-metrics-score.sh``: tuetschek/e2e-metrics with the Perl
mteval script) and by ``prefixtune.metrics.evaluate``. The official numbers are recorded, with each
file's SHA-256, in ``benchmarks/results/official/e2e.json`` (tests/test_official_scores.py checks
that prefixtune still equals them and that no prediction file is missing), and the comparison is
written to ``benchmarks/results/official/e2e.md``. Prints one JSON line: the largest difference per
metric.

    python benchmarks/official_scores.py                 # score files not yet recorded (or changed)
    python benchmarks/official_scores.py --all           # re-score every file with the official scorer
    python benchmarks/official_scores.py --record-cases  # the official numbers of tests/e2e_cases.py

Needs Java and Perl's XML::Twig (``apt-get install -y default-jre-headless libxml-twig-perl``); the
official scorer takes about a minute per 630-MR file on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared"
SCORER = SHARED / "tools" / "e2e-metrics-score.sh"
E2E_TEST = SHARED / "data" / "e2e" / "testset_w_refs.csv"
RESULTS = HERE / "results"
RECORD = RESULTS / "official" / "e2e.json"
CASES = ROOT / "tests" / "data" / "official_e2e_cases.json"
# the official scorer's names -> prefixtune's keys
KEYS = {"BLEU": "bleu", "NIST": "nist", "METEOR": "meteor", "ROUGE_L": "rouge_l", "CIDEr": "cider"}
# agreement required: the official scorer prints 4 decimals
TOLERANCE = {"bleu": 0.0005, "meteor": 0.0005, "rouge_l": 0.0005, "nist": 0.005, "cider": 0.005}


def scorer_missing() -> str | None:
    """Why the official E2E scorer cannot run here, or None when it can."""
    if not SCORER.is_file():
        return f"the official scorer is not at {SCORER}"
    if shutil.which("java") is None:
        return "Java is not installed (apt-get install -y default-jre-headless)"
    if shutil.which("perl") is None or subprocess.run(["perl", "-MXML::Twig", "-e1"], capture_output=True).returncode:
        return "Perl's XML::Twig is not installed (apt-get install -y libxml-twig-perl)"
    return None


def official_e2e(references: Path, predictions: Path) -> dict[str, float]:
    """The official E2E scorer's five numbers for a reference file and a prediction file."""
    run = subprocess.run([str(SCORER), str(references), str(predictions)], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"the official E2E scorer failed on {predictions}:\n{run.stderr[-2000:]}")
    found = dict(re.findall(r"^(BLEU|NIST|METEOR|ROUGE_L|CIDEr): (\S+)$", run.stdout, re.M))
    if set(found) != set(KEYS):
        raise RuntimeError(f"unexpected output of the official E2E scorer:\n{run.stdout}")
    return {KEYS[k]: float(v) for k, v in found.items()}


def differences(official: dict[str, float], ours: dict[str, float]) -> dict[str, float]:
    return {k: abs(ours[k] - official[k]) for k in TOLERANCE}


def within_tolerance(official: dict[str, float], ours: dict[str, float]) -> bool:
    return all(d <= TOLERANCE[k] for k, d in differences(official, ours).items())


def e2e_prediction_files() -> list[Path]:
    """Every committed E2E test prediction file (630 lines, one per unique test MR)."""
    files = sorted((RESULTS / "lowdata").glob("*.txt")) + sorted(RESULTS.glob("*/test_predictions.txt"))
    return [f for f in files if f.is_file()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ours_on_file(path: Path) -> dict[str, float]:
    from prefixtune.evaluation import evaluate_files

    return evaluate_files("e2e", E2E_TEST, path)


def record_files(rescore_all: bool) -> dict:
    from prefixtune.files import write_json

    record = json.loads(RECORD.read_text()) if RECORD.is_file() else {}
    files = e2e_prediction_files()
    wanted = {str(f.relative_to(RESULTS)) for f in files}
    record = {k: v for k, v in record.items() if k in wanted}  # files no longer committed drop out
    for n, path in enumerate(files, 1):
        key, digest = str(path.relative_to(RESULTS)), sha256(path)
        if rescore_all or record.get(key, {}).get("sha256") != digest:
            print(f"[{n}/{len(files)}] official scorer: {key}", file=sys.stderr, flush=True)
            record[key] = {"sha256": digest, "official": official_e2e(E2E_TEST, path)}
        record[key]["prefixtune"] = ours_on_file(path)
        write_json(RECORD, dict(sorted(record.items())))  # after each file: a killed run keeps what it scored
    _table(record)
    worst = {k: max(differences(r["official"], r["prefixtune"])[k] for r in record.values()) for k in TOLERANCE}
    ok = all(within_tolerance(r["official"], r["prefixtune"]) for r in record.values())
    return {"benchmark": "official_scores", "e2e_files": len(record), "all_within_tolerance": ok,
            **{f"max_abs_diff_{k}": round(v, 6) for k, v in worst.items()}}


def _table(record: dict) -> None:
    from prefixtune.files import atomic_write

    rows = [
        "# prefixtune's E2E metrics vs the official E2E scorer (benchmarks/official_scores.py)",
        "",
        "Each committed test prediction file, scored by the official scorer (tuetschek/e2e-metrics, Perl mteval)",
        "and by `prefixtune evaluate`. Required agreement: BLEU/METEOR/ROUGE-L 0.0005, NIST/CIDEr 0.005.",
        "",
        "| file | BLEU official / ours | NIST official / ours | METEOR official / ours | ROUGE-L official / ours "
        "| CIDEr official / ours | agrees |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in record.items():
        o, p = r["official"], r["prefixtune"]
        cells = [f"{o[k]:.4f} / {p[k]:.4f}" for k in ("bleu", "nist", "meteor", "rouge_l", "cider")]
        rows.append(f"| {key} | " + " | ".join(cells) + f" | {'yes' if within_tolerance(o, p) else '**no**'} |")
    text = "\n".join(rows) + "\n"
    atomic_write(RECORD.with_suffix(".md"), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def record_cases() -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from e2e_cases import cases, write_official_inputs

    from prefixtune.files import write_json

    out = {}
    for name, (refs, outputs) in cases(SHARED / "data" / "e2e").items():
        print(f"official scorer: case {name}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            out[name] = official_e2e(*write_official_inputs(refs, outputs, Path(tmp)))
    write_json(CASES, out)
    return {"benchmark": "official_scores", "cases": len(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="re-score every file with the official scorer")
    ap.add_argument("--record-cases", action="store_true", help="record the official numbers of tests/e2e_cases.py")
    args = ap.parse_args()
    missing = scorer_missing()
    if missing:
        sys.exit(f"cannot run the official E2E scorer: {missing}")
    print(json.dumps(record_cases() if args.record_cases else record_files(args.all)))


if __name__ == "__main__":
    main()
