"""`prefixtune evaluate`, `generate --task` and `train --eval` (issue 3, points 6 and 7)."""

import json
import shutil

import pytest
from paths import E2E
from test_metrics import OFFICIAL, TOLERANCE
from tiny import save_tiny_model_dir

from prefixtune.cli import main

EXAMPLE = E2E / "metrics-example"


def _run(capsys, argv):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def test_evaluate_json_equals_the_official_e2e_scores(capsys):
    code, out, _ = _run(
        capsys,
        [
            "evaluate",
            "--task",
            "e2e",
            "--references",
            str(EXAMPLE / "devel-conc.txt"),
            "--predictions",
            str(EXAMPLE / "baseline-output.txt"),
            "--json",
        ],
    )
    scores = json.loads(out)
    assert code == 0 and list(scores) == ["bleu", "nist", "meteor", "rouge_l", "cider"]
    assert all(abs(scores[k] - v) <= TOLERANCE[k] for k, v in OFFICIAL.items())
    code, out, _ = _run(
        capsys,
        [
            "evaluate",
            "--task",
            "e2e",
            "--references",
            str(EXAMPLE / "devel-conc.txt"),
            "--predictions",
            str(EXAMPLE / "baseline-output.txt"),
        ],
    )
    assert "BLEU     0.7203" in out and "CIDEr    2.3039" in out


def _refs_and_preds(tmp_path, lines):
    refs = tmp_path / "refs.csv"
    refs.write_text(
        'mr,ref\n"name[A], food[Thai]",A serves Thai food.\n"name[A], food[Thai]",Thai at A.\n"name[B]",B is a place.\n'
    )
    preds = tmp_path / "preds.txt"
    preds.write_bytes(lines)
    return ["evaluate", "--task", "e2e", "--references", str(refs), "--predictions", str(preds)]


@pytest.mark.parametrize(
    "predictions, message",
    [
        (b"A serves Thai food.\n", "preds.txt: 1 prediction lines, but .*refs.csv has 2 unique sources"),
        (b"", "preds.txt: file is empty"),
        (b"A serves \xff food.\nB.\n", "preds.txt:1: not UTF-8"),
    ],
)
def test_bad_predictions_name_the_file(tmp_path, capsys, predictions, message):
    import re

    code, _, err = _run(capsys, _refs_and_preds(tmp_path, predictions))
    assert code == 2 and re.search(message, err) and "\n" not in err


def test_reference_file_with_missing_columns(tmp_path, capsys):
    (tmp_path / "refs.csv").write_text("mr\nname[A]\n")
    (tmp_path / "p.txt").write_text("x\n")
    code, _, err = _run(
        capsys,
        [
            "evaluate",
            "--task",
            "e2e",
            "--references",
            str(tmp_path / "refs.csv"),
            "--predictions",
            str(tmp_path / "p.txt"),
        ],
    )
    assert code == 2 and "refs.csv: source 1 ('name : A') has no reference" in err
    (tmp_path / "refs.csv").write_text("meaning,text\nname[A],x\n")
    code, _, err = _run(
        capsys,
        [
            "evaluate",
            "--task",
            "e2e",
            "--references",
            str(tmp_path / "refs.csv"),
            "--predictions",
            str(tmp_path / "p.txt"),
        ],
    )
    assert code == 2 and "refs.csv:1: expected header 'mr,ref'" in err


def test_unknown_task_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--task", "e3e", "--references", "r", "--predictions", "p"])
    assert e.value.code == 2 and "invalid choice: 'e3e'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny-llama")


def test_train_eval_then_generate_then_evaluate(model_dir, tmp_path, capsys):
    data = tmp_path / "e2e"
    data.mkdir()
    for name in ("trainset.csv", "devset.csv"):
        shutil.copy(E2E / name, data / name)  # a scratch copy inside the test's own tmp dir
    run = tmp_path / "run"
    code, _, err = _run(
        capsys,
        [
            "train",
            "--model",
            model_dir,
            "--preset",
            "e2e",
            "--data",
            str(data),
            "--train-size",
            "20",
            "--dev-size",
            "8",
            "--max-steps",
            "2",
            "--no-progress",
            "--eval",
            "--eval-size",
            "6",
            "--num-beams",
            "2",
            "--max-new-tokens",
            "8",
            "--output",
            str(run),
        ],
    )
    assert code == 0, err
    report = json.loads((run / "metrics.json").read_text())
    assert report["sources"] == 6 and set(OFFICIAL) <= set(report)
    assert report["decoding"]["num_beams"] == 2 and report["decoding"]["max_new_tokens"] == 8
    assert len((run / "dev_predictions.txt").read_text().splitlines()) == 6
    doc = json.loads((run / "train_config.json").read_text())
    assert doc["lr"] == 8e-5 and doc["batch_size"] == 10 and doc["prefix"]["num_virtual_tokens"] == 5
    preds = tmp_path / "dev.txt"
    code, _, err = _run(
        capsys,
        [
            "generate",
            "--prefix",
            str(run),
            "--task",
            "e2e",
            "--data",
            str(data),
            "--split",
            "dev",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "64",
            "--no-progress",
            "--output",
            str(preds),
        ],
    )
    assert code == 0, err
    code, out, err = _run(
        capsys,
        ["evaluate", "--task", "e2e", "--references", str(data / "devset.csv"), "--predictions", str(preds), "--json"],
    )
    assert code == 0, err
    assert set(json.loads(out)) == set(OFFICIAL)
