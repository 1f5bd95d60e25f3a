"""benchmarks/lowdata.py's report: every run listed, means only over subsets every system finished."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "lowdata.py"


def _lowdata():
    spec = importlib.util.spec_from_file_location("lowdata", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(system, size, subset, bleu, device="cpu"):
    scores = {"bleu": bleu, "nist": 8.0, "meteor": 0.4, "rouge_l": 0.6, "cider": 1.5, "best_dev_loss": 1.7}
    return {"system": system, "size": size, "subset": subset, "device": device, **scores}


def test_means_are_like_against_like(tmp_path):
    lowdata = _lowdata()
    results = [
        _run("prefixtune", 50, 0, 0.60),
        _run("peft", 50, 0, 0.40, "cuda:0"),
        _run("full", 50, 0, 0.50),
        _run("prefixtune", 50, 1, 0.10),  # subset 1 lacks peft and full: listed, not averaged
        _run("prefixtune", 100, 0, 0.70),
    ]
    summary = lowdata._report(tmp_path, results, ["prefixtune", "peft", "full"])
    assert summary == {
        "benchmark": "lowdata",
        "runs": 5,
        "prefixtune_50_bleu": 60.0,
        "peft_50_bleu": 40.0,
        "full_50_bleu": 50.0,
    }
    table = (tmp_path / "results.md").read_text()
    assert "| 50 | 1 | 10.0 (cpu) | – | – |" in table
    assert "| 50 | 0 | 60.0 (cpu) | 40.0 (cuda) | 50.0 (cpu) |" in table
    assert "| prefixtune | 50 | 1 | 60.0 |" in table
    assert "| prefixtune | 100 |" not in table  # 100 has no complete subset
    assert (tmp_path / "bleu_vs_size.png").stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp*"))
