"""The benchmarks' own machinery (issue 17): device and system options, the limits they measure, the random-weight
model the GPU check runs on. Speed itself is never asserted here (that is the benchmarks' job)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from paths import E2E
from tiny import save_tiny_model_dir

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_decode  # noqa: E402
import machine  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny-llama")


def test_systems_option():
    assert bench_decode._systems("auto", "cpu") == bench_decode.SYSTEMS
    assert bench_decode._systems("auto", "cuda") == bench_decode.TORCH_SYSTEMS  # no CTranslate2 CUDA build assumed
    assert bench_decode._systems("hf_generate", "cpu") == ("prefixtune", "hf_generate")  # prefixtune always runs
    assert bench_decode._systems("hf_generate,prefixtune,hf_generate", "cpu") == ("prefixtune", "hf_generate")
    with pytest.raises(SystemExit, match="unknown vllm"):
        bench_decode._systems("prefixtune,vllm", "cpu")


def test_limits_are_measured_on_the_cpu():
    assert machine.copy_bandwidth("cpu", megabytes=8, repeats=2) > 1e8  # bytes/s
    assert machine.matmul_rate(torch.float32, "cpu", n=128, repeats=2) > 1e8  # FLOP/s
    assert machine.spec_peak("cpu") is None and machine.peak_memory_mb("cpu") is None


@pytest.mark.parametrize(
    ("name", "tflops"),
    [("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("Tesla T4", None)],
)
def test_spec_peak_of_known_gpus(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = machine.spec_peak("cuda")
    assert (peak is None) if tflops is None else peak == pytest.approx(tflops * 1e12)


def test_bench_decode_on_a_tiny_model_compares_the_systems_it_is_asked_for(model_dir, tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(bench_decode, "_limits", lambda s: measured.append(s.device) or (2e7, 2e11))
    out = tmp_path / "decode.md"
    argv = ["--model", model_dir, "--data", str(E2E), "--systems", "hf_generate,prefixtune_forward"]
    argv += ["--new-tokens", "3", "--batch1-inputs", "2", "--rows", "3", "--beam-inputs", "3", "--repeats", "1"]
    summary = bench_decode.main([*argv, "--output", str(out)])
    assert summary["systems"] == ["prefixtune", "hf_generate", "prefixtune_forward"]
    assert measured == [torch.device("cpu")] * 3  # at the start and after each greedy measurement
    # the three Torch systems decode the same tokens (the same prefix, the same model)
    for key in ("batch1_greedy_equal", "batch64_greedy_equal", "beam5_equal"):
        assert summary[key] == {"hf_generate": 1.0, "prefixtune_forward": 1.0}
    for key in ("batch1_ms_per_token", "hf_generate_batch1_ms_per_token", "prefixtune_forward_batch64_tokens_per_s"):
        assert summary[key] > 0
    assert not any(k.startswith("ctranslate2") for k in summary)  # not asked for: not run, not reported
    assert summary["bandwidth_floor_ms_per_token"] == pytest.approx(summary["parameters"] * 4 / 2e7 * 1000, rel=0.01)
    table = out.read_text()
    assert "| measure | prefixtune | HF generate + prefix cache | prefixtune, transformers forward | floor |" in table
    assert "CTranslate2" not in table
    assert json.loads(out.with_suffix(".json").read_text()) == summary


def test_bench_train_runs_on_the_device_asked_for(model_dir, tmp_path):
    out = tmp_path / "train.md"
    cmd = [sys.executable, str(BENCH / "bench_train.py"), "--model", model_dir, "--data", str(E2E), "--device", "cpu"]
    cmd += ["--systems", "prefixtune,prefixtune_micro,peft", "--steps", "2", "--warmup", "1", "--batch-size", "4"]
    cmd += ["--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["speedup_vs_peft"] > 0 and summary["speedup_vs_peft_micro"] > 0
    # two length-sorted micro-batches per step: the same gradients, so the same training
    assert summary["prefixtune_micro_final_loss"] == pytest.approx(summary["prefixtune_final_loss"], abs=1e-3)
    assert "spec_peak_tflop_s" not in summary and "peak_gpu_ratio_vs_peft" not in summary  # CPU: no MFU, no GPU memory
    assert "frozen model in fp32 on cpu" in out.read_text()


def test_random_weights_make_a_loadable_model_of_the_same_shapes(model_dir, tmp_path):
    import random_weights

    from prefixtune import load_base

    source = tmp_path / "config-only"
    source.mkdir()
    for f in Path(model_dir).iterdir():
        if f.suffix != ".safetensors":
            (source / f.name).write_bytes(f.read_bytes())
    target = random_weights.main([str(source), str(tmp_path / "random"), "--seed", "3"])
    original, _ = load_base(model_dir)
    made, tok = load_base(str(target))
    shapes = {n: p.shape for n, p in original.named_parameters()}
    assert {n: p.shape for n, p in made.named_parameters()} == shapes
    assert not torch.equal(made.lm_head.weight, original.lm_head.weight)  # new values, not a copy
    assert tok("hello")["input_ids"]


def test_ceilings_count_the_model_parameters_and_compare_each_target(model_dir, tmp_path):
    import bench_ceilings

    from prefixtune import load_base

    out = tmp_path / "ceilings.md"
    argv = ["--model", model_dir, "--rows", "4", "--cache-len", "8", "--batch", "2", "--length", "6"]
    summary = bench_ceilings.main([*argv, "--repeats", "1", "--output", str(out)])
    base, _ = load_base(model_dir)
    assert summary["parameters"] == sum(p.numel() for p in base.parameters())  # the floors' parameter count
    assert summary["rows_ceiling_vs_flop_floor"] == pytest.approx(
        summary["rows_ceiling_tokens_per_s"] / summary["flop_floor_tokens_per_s"], rel=0.01, abs=2e-4
    )
    assert summary["train_ceiling_tokens_per_s"] == pytest.approx(
        12 / (2 * summary["train_layer_ms"] / 1000 + summary["train_head_ms"] / 1000), rel=0.02
    )
    table = out.read_text()
    assert "≥ 0.85 of bound" in table and "≤ 1.5× floor" in table
