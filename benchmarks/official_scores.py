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
    python benchmarks/official_scores.py --webnlg-dart EVALUATION_DIR

Needs Java and Perl's XML::Twig (``apt-get install -y default-jre-headless libxml-twig-perl``); the
official scorer takes about a minute per 630-MR file on a 2-core CPU.

WebNLG 2017 and DART (``--webnlg-dart``): EVALUATION_DIR is the ``evaluation/`` folder of the public
repository Yale-LILY/dart (commit bb644b1): ``run_eval_on_webnlg.sh`` (the WebNLG 2017 challenge's
evaluation, as the Prefix-Tuning authors ran it) and ``run_eval_on_dart.sh``. Their BLEU
(``multi-bleu.perl``), METEOR 1.5 and TER (tercom 0.7.25) steps are run exactly as those scripts
run them, on the fixed system outputs that repository ships (``example/bart-large_webnlg-all.txt``,
``example/bart-large_dart.txt``, copied to ``benchmarks/results/official/``), on the whole test set
and on its first 300 entries (what the test suite recomputes with prefixtune in seconds). The
METEOR jar is missing from that repository's snapshots; the pycocoevalcap 1.2 wheel's
``meteor-1.5.jar`` and ``paraphrase-en.gz`` (the same release) stand in. The scripts' MoverScore,
BERTScore and BLEURT steps need model downloads and are not run. Writes
``benchmarks/results/official/webnlg_dart.json`` and ``.md``.
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
    return {
        "benchmark": "official_scores",
        "e2e_files": len(record),
        "all_within_tolerance": ok,
        **{f"max_abs_diff_{k}": round(v, 6) for k, v in worst.items()},
    }


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


OUTPUTS = {
    "webnlg": RESULTS / "official" / "bart-large_webnlg-all.txt",
    "dart": RESULTS / "official" / "bart-large_dart.txt",
}
WEBNLG_DART_RECORD = RESULTS / "official" / "webnlg_dart.json"
REFERENCES = {
    "webnlg": SHARED / "data" / "webnlg2017" / "test" / "testdata_with_lex.xml",
    "dart": SHARED / "data" / "dart" / "v1.1.1" / "dart-v1.1.1-full-test.xml",
}
SUBSET = 300  # entries the test suite rescores (TER in Python takes minutes on a whole test set)


def _venv_python() -> str:
    """A private Python with the WebNLG evaluation's two dependencies (natsort, unidecode)."""
    home = Path.home() / ".cache" / "prefixtune-official"
    python = home / "venv" / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(home / "venv")], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "natsort", "unidecode"], check=True)
    return str(python)


def _keep_lines(path: Path, n: int | None, per_entry: int = 1) -> None:
    if n is not None:
        lines = path.read_text(encoding="utf-8").split("\n")
        path.write_text("\n".join(lines[: n * per_entry]) + "\n", encoding="utf-8")


def _keep_ids(path: Path, n: int | None, first_id: int) -> None:
    """tercom's trans format: keep the lines of the first n ids (WebNLG counts from 1, DART from 0)."""
    if n is not None:
        lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
        keep = [x for x in lines if int(re.search(r"\(id(\d+)\)$", x).group(1)) < first_id + n]
        path.write_text("\n".join(keep) + "\n", encoding="utf-8")


def _three_steps(folder: Path, hyp: Path, refs: list[Path], meteor: tuple[Path, int], ter: tuple[Path, Path], lc: bool):
    """multi-bleu.perl, METEOR 1.5 and tercom 0.7.25 as the official scripts call them."""
    bleu_cmd = ["perl", str(folder / "multi-bleu.perl"), *(["-lc"] if lc else []), *map(str, refs)]
    with hyp.open() as stdin:
        bleu = subprocess.run(bleu_cmd, stdin=stdin, capture_output=True, text=True, check=True).stdout
    jar = folder / "meteor-1.5" / "meteor-1.5.jar"
    meteor_cmd = [
        "java",
        "-Xmx2G",
        "-jar",
        str(jar),
        str(hyp),
        str(meteor[0]),
        "-l",
        "en",
        "-norm",
        "-r",
        str(meteor[1]),
    ]
    met = subprocess.run(meteor_cmd, cwd=jar.parent, capture_output=True, text=True, check=True).stdout
    tercom = folder / "tercom-0.7.25" / "tercom.7.25.jar"
    ter_cmd = ["java", "-jar", str(tercom), "-h", str(ter[0]), "-r", str(ter[1])]
    ter_out = subprocess.run(ter_cmd, cwd=tercom.parent, capture_output=True, text=True, check=True).stdout
    return {
        "bleu": float(re.search(r"BLEU = ([0-9.]+)", bleu).group(1)) / 100,
        "meteor": float(re.search(r"Final score:\s+([0-9.]+)", met).group(1)),
        "ter": float(re.search(r"Total TER: ([0-9.]+)", ter_out).group(1)),
    }


def official_webnlg(evaluation: Path, output: Path, n: int | None) -> dict[str, float]:
    """run_eval_on_webnlg.sh's all-categories BLEU, METEOR and TER, on the first n entries (all: None)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = _working_copy(evaluation, Path(tmp), skip="dart_reference")
        web = folder / "webnlg-automatic-evaluation"
        for sub in ("submissions", "teams", "eval", "references"):
            (web / sub).mkdir(exist_ok=True)
        shutil.copy(output, web / "submissions" / "team.txt")
        subprocess.run([_venv_python(), "evaluation.py", "team"], cwd=web, capture_output=True, check=True)
        refs = [web / "references" / f"gold-all-cat-reference{i}.lex" for i in range(3)]
        hyp, ter_hyp = web / "teams" / "team_all-cat.txt", web / "teams" / "team_all-cat_ter.txt"
        meteor_refs, ter_refs = (
            web / "references" / "gold-all-cat-reference-3ref.meteor",
            web / "references" / "gold-all-cat-reference-3ref.ter",
        )
        for f in (*refs, hyp):
            _keep_lines(f, n)
        _keep_lines(meteor_refs, n, per_entry=3)
        _keep_ids(ter_hyp, n, first_id=1)
        _keep_ids(ter_refs, n, first_id=1)
        return _three_steps(folder, hyp, refs, (meteor_refs, 3), (ter_hyp, ter_refs), lc=True)


def official_dart(evaluation: Path, output: Path, n: int | None) -> dict[str, float]:
    """run_eval_on_dart.sh's BLEU, METEOR and TER, on the first n entries (all: None)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = _working_copy(evaluation, Path(tmp), skip="webnlg-automatic-evaluation")
        hyp = folder / "output.txt"
        shutil.copy(output, hyp)
        refs = [folder / "dart_reference" / f"all-delex-reference{i}.lex" for i in range(3)]
        for f in (*refs, hyp):
            _keep_lines(f, n)
        subprocess.run([_venv_python(), "prepare_files.py", str(hyp), *map(str, refs)], cwd=folder, check=True)
        meteor_refs = folder / "all-notdelex-refs-meteor.txt"
        return _three_steps(
            folder,
            hyp,
            refs,
            (meteor_refs, 8),
            (folder / "relexicalised_predictions-ter.txt", folder / "all-notdelex-refs-ter.txt"),
            lc=False,
        )


def _working_copy(evaluation: Path, tmp: Path, skip: str) -> Path:
    """A scratch copy of the evaluation folder (the scripts write beside themselves), with METEOR's jar.

    The METEOR 1.5 jar and English paraphrase table come from the pycocoevalcap wheel (missing from snapshots).
    """
    from prefixtune.metrics.coco import package_dir

    folder = tmp / "evaluation"
    shutil.copytree(evaluation, folder, ignore=shutil.ignore_patterns("bleurt", skip))
    target = folder / "meteor-1.5"
    (target / "data").mkdir(parents=True, exist_ok=True)
    if not (target / "meteor-1.5.jar").is_file():
        shutil.copy(package_dir() / "meteor" / "meteor-1.5.jar", target / "meteor-1.5.jar")
    if not (target / "data" / "paraphrase-en.gz").is_file():
        shutil.copy(package_dir() / "meteor" / "data" / "paraphrase-en.gz", target / "data" / "paraphrase-en.gz")
    return folder


def prefixtune_webnlg_dart(task: str, n: int | None) -> dict[str, float]:
    """prefixtune's scores of the fixed output on the first n scored items (all: None)."""
    from prefixtune.data import load_examples
    from prefixtune.evaluation import official_items
    from prefixtune.metrics import evaluate

    items = official_items(task, load_examples(task, REFERENCES[task], "test"))[:n]
    outputs = OUTPUTS[task].read_text(encoding="utf-8").splitlines()[:n]
    return evaluate(task, [refs for _, refs in items], [o.strip() for o in outputs])


def record_webnlg_dart(evaluation: Path) -> dict:
    from prefixtune.files import atomic_write, write_json

    official = {"webnlg": official_webnlg, "dart": official_dart}
    record = {}
    for task in ("webnlg", "dart"):
        for label, n in (("all", None), (f"first_{SUBSET}", SUBSET)):
            print(f"{task} {label}: official scripts, then prefixtune", file=sys.stderr, flush=True)
            record[f"{task}_{label}"] = {
                "official": official[task](evaluation, OUTPUTS[task], n),
                "prefixtune": prefixtune_webnlg_dart(task, n),
            }
            write_json(WEBNLG_DART_RECORD, record)
    rows = [
        "# prefixtune's WebNLG 2017 and DART metrics vs their official evaluation (benchmarks/official_scores.py)",
        "",
        "The fixed outputs are BART-large's, as shipped in Yale-LILY/dart's `evaluation/example/`. Official: the",
        "BLEU/METEOR/TER steps of `run_eval_on_webnlg.sh` (all categories) and `run_eval_on_dart.sh`.",
        "",
        "| task | entries | BLEU official / ours | METEOR official / ours | TER official / ours |",
        "|---|---|---|---|---|",
    ]
    for key, r in record.items():
        o, p = r["official"], r["prefixtune"]
        cells = [f"{o[k]:.4f} / {p[k]:.4f}" for k in ("bleu", "meteor", "ter")]
        rows.append(
            f"| {key.split('_', 1)[0]} | {key.split('_', 1)[1].replace('_', ' ')} | " + " | ".join(cells) + " |"
        )
    text = "\n".join(rows) + "\n"
    atomic_write(WEBNLG_DART_RECORD.with_suffix(".md"), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    worst = {
        k: max(abs(r["official"][k] - r["prefixtune"][k]) for r in record.values()) for k in ("bleu", "meteor", "ter")
    }
    return {"benchmark": "official_scores_webnlg_dart", **{f"max_abs_diff_{k}": round(v, 6) for k, v in worst.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="re-score every file with the official scorer")
    ap.add_argument("--record-cases", action="store_true", help="record the official numbers of tests/e2e_cases.py")
    ap.add_argument("--webnlg-dart", metavar="EVALUATION_DIR", help="Yale-LILY/dart's evaluation/ folder")
    args = ap.parse_args()
    if args.webnlg_dart:
        print(json.dumps(record_webnlg_dart(Path(args.webnlg_dart))))
        return
    missing = scorer_missing()
    if missing:
        sys.exit(f"cannot run the official E2E scorer: {missing}")
    print(json.dumps(record_cases() if args.record_cases else record_files(args.all)))


if __name__ == "__main__":
    main()
