"""Metrics equal to the official scorers (issue 3, point 5)."""

import subprocess

import pytest
from paths import E2E
from sacrebleu.metrics import BLEU, TER

from prefixtune import PrefixTuneError
from prefixtune.data import group_references, load_examples
from prefixtune.evaluation import read_conc_references
from prefixtune.metrics import evaluate, rouge
from prefixtune.metrics.mteval import bleu_nist, tokenize
from prefixtune.metrics.webnlg import multi_bleu, normalize

EXAMPLE = E2E / "metrics-example"
# The official E2E scorer (measure_scores.py) on these files, from ../shared/data/SOURCES.md.
OFFICIAL = {"bleu": 0.7203, "nist": 7.8212, "meteor": 0.4801, "rouge_l": 0.7910, "cider": 2.3039}
TOLERANCE = {"bleu": 0.0005, "nist": 0.005, "meteor": 0.0005, "rouge_l": 0.0005, "cider": 0.005}


def example():
    refs = [r for _, r in read_conc_references(EXAMPLE / "devel-conc.txt")]
    hyps = (EXAMPLE / "baseline-output.txt").read_text(encoding="utf-8").splitlines()
    return refs, hyps


def test_e2e_scores_equal_the_official_scorer_on_its_example():
    refs, hyps = example()
    assert [len(r) for r in refs] == [6, 6, 6, 6, 9, 11, 37, 39, 10, 7]  # a variable number of references
    scores = evaluate("e2e", refs, hyps)
    assert set(scores) == set(OFFICIAL)
    for key, value in OFFICIAL.items():
        assert abs(scores[key] - value) <= TOLERANCE[key], (key, scores[key])


def test_mteval_bleu_equals_an_independent_implementation_on_the_e2e_dev_set():
    groups = group_references(load_examples("e2e", E2E, "dev"))
    hyps = [refs[0] for _, refs in groups]  # one human reference as the "system"
    refs = [refs[1:] for _, refs in groups]  # 1 to 11 references each
    ours = bleu_nist(refs, hyps)["bleu"]
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    theirs = BLEU(tokenize="13a", lowercase=True).corpus_score(hyps, streams).score / 100
    assert abs(ours - theirs) < 1e-6
    naive = BLEU().corpus_score(hyps, [[r[0] for r in refs]]).score / 100  # what a careless call reports
    assert abs(naive - ours) > 0.05


def test_mteval_tokenization():
    assert tokenize("The Eagle, a 5-star pub (near £30.50)!") == [
        "the",
        "eagle",
        ",",
        "a",
        "5",
        "-",
        "star",
        "pub",
        "(",
        "near",
        "£30.50",
        ")",
        "!",
    ]
    assert tokenize("CAFÉ it's") == ["cafÉ", "it's"]  # ASCII-only lowercasing, apostrophes kept, as the script


def test_nist_rewards_informative_ngrams_and_penalizes_short_output():
    refs = [["the vaults is a pub near café adriatic"]] * 3
    long = bleu_nist(refs, ["the vaults is a pub near café adriatic"] * 3)["nist"]
    short = bleu_nist(refs, ["the vaults"] * 3)["nist"]
    assert long > short > 0


def test_webnlg_normalization_and_multi_bleu():
    assert normalize("Aarhus Airport's elevation: 25.0 m, Café!") == "aarhus airport ' s elevation : 25 . 0 m , cafe !"
    # DART's references keep their letters (dart_reference/*.lex): no transliteration
    assert normalize("Café Ñu", transliterate=False) == "café ñu"
    groups = group_references(load_examples("webnlg", E2E.parent / "webnlg2017", "dev"))
    hyps = [normalize(r[0]) for _, r in groups]
    three = [([normalize(x) for x in r[1:4]] + ["", "", ""])[:3] for _, r in groups]
    theirs = BLEU(tokenize="none", lowercase=True).corpus_score(hyps, list(map(list, zip(*three)))).score / 100
    assert abs(multi_bleu(three, hyps) - theirs) < 1e-6


def test_ter_counts_edits_over_reference_length():
    assert abs(TER().corpus_score(["a b c d"], [["a b x d"]]).score / 100 - 0.25) < 1e-9


def test_ter_in_worker_processes_equals_one_call(monkeypatch):
    """Long inputs are scored in parallel chunks; the summed statistics give sacrebleu's own corpus TER."""
    from prefixtune.metrics import webnlg

    groups = group_references(load_examples("e2e", E2E, "dev"))[:90]
    hyps = [webnlg.normalize(refs[-1]) + (" extra words" if i % 3 else "") for i, (_, refs) in enumerate(groups)]
    refs = [[webnlg.normalize(r) for r in rs[:3]] for _, rs in groups]  # 1 to 3 references each
    streams = [[rs[i] if i < len(rs) else None for rs in refs] for i in range(3)]
    expected = TER().corpus_score(hyps, streams).score / 100
    monkeypatch.setattr(webnlg, "PARALLEL_TER_SEGMENTS", 20)
    calls, popen = [], subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a) or popen(*a, **k))
    assert webnlg.ter(hyps, refs, workers=3) == pytest.approx(expected, abs=1e-12)
    assert len(calls) == 3  # three worker processes did the work


@pytest.mark.parametrize(
    "task, keys",
    [
        ("webnlg", {"bleu", "meteor", "ter"}),
        ("dart", {"bleu", "meteor", "ter"}),
        ("xsum", {"rouge1", "rouge2", "rougeL"}),
    ],
)
def test_keys_per_task_and_perfect_output(task, keys):
    refs = [["The Vaults is a pub near Café Adriatic."], ["Alimentum serves cheap food."]]
    scores = evaluate(task, refs, [r[0] for r in refs])
    assert set(scores) == keys
    if task == "xsum":
        assert all(abs(v - 1) < 1e-9 for v in scores.values())
    else:
        assert abs(scores["bleu"] - 1) < 1e-9 and scores["ter"] == 0 and scores["meteor"] > 0.9


def test_rouge_uses_stemming_and_the_best_reference():
    assert rouge([["the cats were running"]], ["the cat was run"])["rouge1"] > 0.7  # stems: cat, run
    best = rouge([["completely different words", "a cat sat"]], ["a cat sat"])
    assert abs(best["rouge1"] - 1) < 1e-9


def test_misaligned_inputs_are_errors():
    with pytest.raises(PrefixTuneError, match="2 predictions for 1 unique sources"):
        evaluate("e2e", [["a"]], ["a", "b"])
    with pytest.raises(PrefixTuneError, match="unknown task 'bleu'"):
        evaluate("bleu", [["a"]], ["a"])


@pytest.mark.slow
def test_the_readme_results_are_what_the_committed_predictions_score():
    import json
    from pathlib import Path

    from prefixtune.evaluation import evaluate_files

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "lowdata-e2e-200"
    stored = json.loads((results / "results.json").read_text())["metrics"]
    scores = evaluate_files("e2e", E2E / "testset_w_refs.csv", results / "test_predictions.txt")
    assert scores == pytest.approx(stored, abs=1e-9)
