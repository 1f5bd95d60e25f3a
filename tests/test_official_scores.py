"""prefixtune's E2E metrics equal the official E2E scorer (issue 14, point 1).

Three layers, so that a metric bug like the NIST length penalty (wrong on 12 of 16 real files while
the scorer's own example passed) cannot come back:
- cases built to reach the length and brevity penalties, uneven reference counts, empty outputs and
  punctuation, against the official numbers recorded from the scorer (always run);
- the same cases against the official scorer run now (wherever Java and XML::Twig are installed);
- every committed E2E test prediction file against the official numbers recorded for it.
"""

import importlib.util
import json
import tempfile
from pathlib import Path

import pytest
from e2e_cases import cases, write_official_inputs
from paths import E2E

from prefixtune.metrics import evaluate

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "official_scores.py"
RECORDED = json.loads((Path(__file__).parent / "data" / "official_e2e_cases.json").read_text())


def _official_scores():
    spec = importlib.util.spec_from_file_location("official_scores", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OFFICIAL = _official_scores()
CASES = cases(E2E)


def _assert_equal(official: dict, ours: dict) -> None:
    for key, tolerance in OFFICIAL.TOLERANCE.items():
        assert ours[key] == pytest.approx(official[key], abs=tolerance), key


def test_every_case_is_recorded():
    assert set(RECORDED) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_e2e_metrics_equal_the_recorded_official_numbers(name):
    references, outputs = CASES[name]
    _assert_equal(RECORDED[name], evaluate("e2e", references, outputs))


def test_the_cases_reach_the_length_penalties():
    """A case set that never shortens the output cannot catch a wrong NIST length penalty."""
    assert RECORDED["short"]["nist"] < 0.1 < RECORDED["long"]["nist"]  # the penalty dominates "short"
    references, outputs = CASES["short"]
    ref_words = sum(len(r.split()) for refs in references for r in refs) / sum(len(refs) for refs in references)
    assert sum(len(o.split()) for o in outputs) / len(outputs) < 0.5 * ref_words


@pytest.mark.slow
@pytest.mark.skipif(OFFICIAL.scorer_missing() is not None, reason=str(OFFICIAL.scorer_missing()))
def test_e2e_metrics_equal_the_official_scorer_run_now():
    for name, (references, outputs) in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            official = OFFICIAL.official_e2e(*write_official_inputs(references, outputs, Path(tmp)))
        assert official == RECORDED[name], f"{name}: the recorded numbers are stale"
        _assert_equal(official, evaluate("e2e", references, outputs))


@pytest.mark.slow
def test_every_committed_e2e_prediction_file_equals_the_official_scorer():
    """Each file's official numbers are recorded (for this exact file) and prefixtune equals them."""
    record = json.loads(OFFICIAL.RECORD.read_text())
    files = OFFICIAL.e2e_prediction_files()
    assert len(files) >= 16
    for path in files:
        key = str(path.relative_to(OFFICIAL.RESULTS))
        assert key in record, f"{key}: not scored by the official scorer (run benchmarks/official_scores.py)"
        assert record[key]["sha256"] == OFFICIAL.sha256(path), f"{key} changed since it was scored"
        _assert_equal(record[key]["official"], OFFICIAL.ours_on_file(path))
