"""benchmarks/lowdata.py's report: every run listed, means only over subsets every system finished."""

import importlib.util
from pathlib import Path

import pytest

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
        _run("lora", 50, 0, 0.40, "cuda:0"),
        _run("full", 50, 0, 0.50),
        _run("prefixtune", 50, 1, 0.10),  # subset 1 lacks lora: listed, not averaged
        _run("prefixtune", 100, 0, 0.70),
        _run("full", 50, 1, 0.25),  # pairs with prefixtune's subset 1 (but not averaged: lora lacks it)
        _run("peft", 50, 0, 0.30),  # not listed: in the run table only
    ]
    summary = lowdata.report(tmp_path, results, ["prefixtune", "lora", "full"])
    assert summary == {
        "benchmark": "lowdata",
        "runs": 7,
        "prefixtune_50_bleu": 60.0,
        "prefixtune_50_bleu_sd": None,  # one subset: no spread
        "lora_50_bleu": 40.0,
        "lora_50_bleu_sd": None,
        "full_50_bleu": 50.0,
        "full_50_bleu_sd": None,
        "prefixtune_minus_lora_50_bleu": 20.0,
        "prefixtune_minus_lora_50_bleu_sd": None,
        "prefixtune_minus_full_50_bleu": -2.5,  # +10 on subset 0, -15 on subset 1
        "prefixtune_minus_full_50_bleu_sd": pytest.approx(17.68, abs=0.01),  # sample sd of (+10, -15)
    }
    table = (tmp_path / "results.md").read_text()
    assert "| train size | subset | prefixtune | lora | full | peft |" in table
    assert "| 50 | 1 | 10.0 (cpu) | – | 25.0 (cpu) | – |" in table
    assert "| 50 | +20.0 (subset 0: +20.0) | -2.5 ± 17.7 (subset 0: +10.0, 1: -15.0) |" in table
    assert "| 50 | 0 | 60.0 (cpu) | 40.0 (cuda) | 50.0 (cpu) | 30.0 (cpu) |" in table
    assert "| prefixtune | 50 | 0 | 60.0 | 8.00 |" in table
    assert "| prefixtune | 100 |" not in table  # 100 has no complete subset
    assert "| peft | 50 |" not in table
    assert (tmp_path / "bleu_vs_size.png").stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp*"))


def test_mean_and_sd_over_three_subsets(tmp_path):
    lowdata = _lowdata()
    results = [_run(s, 50, k, b) for k in range(3) for s, b in (("prefixtune", 0.5 + 0.1 * k), ("full", 0.5))]
    summary = lowdata.report(tmp_path, results, ["prefixtune", "full"])
    assert summary["prefixtune_50_bleu"] == pytest.approx(60.0)
    assert summary["prefixtune_50_bleu_sd"] == pytest.approx(10.0)  # sample sd of 50, 60, 70
    assert summary["full_50_bleu_sd"] == pytest.approx(0.0)
    assert summary["prefixtune_minus_full_50_bleu"] == pytest.approx(10.0)
    table = (tmp_path / "results.md").read_text()
    assert "| prefixtune | 50 | 0, 1, 2 | 60.0 ± 10.0 |" in table
    assert "+10.0 ± 10.0 (subset 0: +0.0, 1: +10.0, 2: +20.0)" in table


def test_runs_end_to_end_and_resumes(tmp_path):
    """A smoke run on a tiny model: each system trains, selects, decodes; finished runs are not redone."""
    import json
    import subprocess
    import sys

    from paths import E2E
    from tiny import save_tiny_model_dir

    model = save_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    systems = "prefixtune,full" + (",peft,lora" if importlib.util.find_spec("peft") else "")
    command = [sys.executable, str(BENCH), "--model", model, "--data", str(E2E), "--sizes", "50", "--subsets", "0"]
    command += ["--systems", systems, "--max-steps", "6", "--dev-size", "4", "--test-limit", "3", "--decode-batch", "2"]
    command += ["--no-score", "--output", str(out)]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    for system in systems.split(","):
        record = json.loads((out / f"{system}-50-0.json").read_text())
        assert (record["system"], record["size"], record["subset"], record["test_mrs"]) == (system, 50, 0, 3)
        assert record["best_dev_loss"] > 0 and "bleu" not in record  # --no-score: decoded, not scored
        assert record["best_step"] in (5, 6)  # 50 examples, batch 10: dev loss after steps 5 and 6
        assert len((out / f"{system}-50-0.txt").read_text().splitlines()) == 3
    assert first.stdout.count('"system"') == len(systems.split(","))
    again = subprocess.run(command, capture_output=True, text=True, check=True)
    assert '"system"' not in again.stdout  # every run cached: nothing retrained
    assert not (out / ".work").exists()  # checkpoints removed once a run's JSON is written


def test_killed_loop_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """A PEFT/full-FT run killed after an epoch continues from its checkpoint to the unbroken run's result."""
    import argparse

    import torch
    from paths import E2E
    from tiny import make_model

    from prefixtune.checkpoint import load_checkpoint

    lowdata = _lowdata()
    monkeypatch.setattr(lowdata, "MAX_STEPS", 8)  # 50 examples, batch 10: checkpoints after steps 5 and 8
    args = argparse.Namespace(data=str(E2E), dev_size=4, seed=42)

    def run(out):
        model, tok = make_model(seed=3)
        base = model.base
        params = list(base.parameters())
        for q in params:
            q.requires_grad_(True)
        best = lowdata._loop(args, base, params, 50, 0, tok, 0, out)  # (best dev loss, its step)
        return best, base.state_dict()

    best, weights = run(tmp_path / "whole")

    class Killed(Exception):
        pass

    class KillAtStep7(lowdata.tqdm):
        def update(self, n=1):
            super().update(n)
            if self.n == 7:
                raise Killed

    monkeypatch.setattr(lowdata, "tqdm", KillAtStep7)
    with pytest.raises(Killed):
        run(tmp_path / "broken")
    assert load_checkpoint(tmp_path / "broken")["step"] == 5
    monkeypatch.setattr(lowdata, "tqdm", KillAtStep7.__base__)
    best_again, weights_again = run(tmp_path / "broken")
    assert best_again == best
    assert weights_again.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(weights_again[name], tensor), name
