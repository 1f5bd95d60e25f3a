"""Multi-process training (issue 6, points 1-3): torchrun + DDP (gloo) equals one process; resume; FSDP2; devices."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from cli_args import train_command
from safetensors.torch import load_file
from tiny import save_tiny_model_dir

from prefixtune import PrefixTuneError
from prefixtune.distributed import Dist, resolve_device, resolve_dtype, without_option

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny-llama")


def _train(model_dir, output, *extra, train_size=60, batch_size=6):
    return train_command(
        model_dir,
        output,
        *extra,
        train_size=train_size,
        dev_size=7,
        epochs=2,
        batch_size=batch_size,
        lr="1e-2",
        checkpoint_every=4,
        num_virtual_tokens=4,
        mid_dim=32,
        device="cpu",
    )


def _run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _prefix(run):
    return load_file(str(run / "prefix.safetensors"))["decoder"]


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_two_processes_train_the_same_prefix_as_one(model_dir, tmp_path):
    # 58 examples, global batch 6: the last batch of each epoch has 4 examples, split 2 + 2;
    # grad-accum 2 makes each process run micro-batches of 2 (then 1) under no_sync.
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_train(model_dir, one, "--grad-accum", "2", train_size=58))
    _run(_train(model_dir, two, "--grad-accum", "2", "--nproc", "2", train_size=58))
    torch.testing.assert_close(_prefix(two), _prefix(one), atol=1e-4, rtol=0)
    log_one, log_two = _log(one), _log(two)
    assert [r["event"] for r in log_two] == [r["event"] for r in log_one]  # one log, written by rank 0 only
    for a, b in zip(log_one, log_two):
        if a["event"] == "step":
            assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)  # the global batch's loss, not one share
            assert b["target_tokens"] == a["target_tokens"]
        if a["event"] == "dev":
            assert b["dev_loss"] == pytest.approx(a["dev_loss"], abs=1e-4)
    config = json.loads((two / "train_config.json").read_text())
    assert config["world_size"] == 2 and config["batch_size"] == 6


def test_more_processes_than_examples_in_a_batch(model_dir, tmp_path):
    """A last batch of 1 example: the second process runs a zero-weight pass and DDP stays in step."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_train(model_dir, one, train_size=13, batch_size=4))
    _run(_train(model_dir, two, "--nproc", "2", train_size=13, batch_size=4))
    torch.testing.assert_close(_prefix(two), _prefix(one), atol=1e-4, rtol=0)


def _steps(run):
    try:
        return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines() if '"step"' in line]
    except (OSError, json.JSONDecodeError):
        return []


def test_distributed_resume_after_kill_9(model_dir, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    cmd = _train(model_dir, whole, "--nproc", "2", train_size=120)
    _run(cmd)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _train(model_dir, killed, "--nproc", "2", train_size=120),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 180
    while time.time() < deadline and max(_steps(killed), default=0) < 9:  # epoch 1 is steps 1..20
        time.sleep(0.01)
    import psutil

    tree = psutil.Process(proc.pid)
    for p in [tree, *tree.children(recursive=True)]:  # the launcher, torchrun and both workers
        p.send_signal(signal.SIGKILL)
    proc.wait()
    reached = max(_steps(killed))
    assert 9 <= reached < 40, "the kill must land before the end"
    _run(_train(model_dir, killed, "--nproc", "2", "--resume", train_size=120))
    start = [r for r in _log(killed) if r["event"] == "start"][-1]
    assert start["resumed"] and 8 <= start["step"] <= reached
    torch.testing.assert_close(_prefix(killed), _prefix(whole), atol=1e-6, rtol=0)


def test_fsdp_shards_the_frozen_base_and_trains_the_same_prefix(model_dir, tmp_path):
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    _run(_train(model_dir, one, train_size=24))
    _run(_train(model_dir, fsdp, "--nproc", "2", "--fsdp", train_size=24))
    torch.testing.assert_close(_prefix(fsdp), _prefix(one), atol=1e-4, rtol=0)
    whole = _log(one)[0]["base_parameters_here"]
    here = _log(fsdp)[0]["base_parameters_here"]  # rank 0's shards
    assert whole > 0 and abs(here - whole / 2) < 0.05 * whole, (here, whole)


def test_fsdp_without_several_processes_is_refused(model_dir, tmp_path, capsys):
    from prefixtune.cli import main

    assert main(_train(model_dir, tmp_path / "r", "--fsdp")[3:]) == 2
    assert "fsdp needs several processes" in capsys.readouterr().err


def test_device_and_dtype_choices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == "fp32"  # the suite pins it (tests/conftest.py)
    assert resolve_dtype("fp16", torch.device("cpu")) == "fp16"
    with pytest.raises(PrefixTuneError, match="--device must be one of"):
        resolve_device("tpu")
    with pytest.raises(PrefixTuneError, match="--dtype must be one of"):
        resolve_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(PrefixTuneError, match="no CUDA device"):
            resolve_device("cuda")


def test_shards_and_relaunch_arguments():
    batch = list(range(7))
    shares = [Dist(r, 3).shard(batch) for r in range(3)]
    assert sorted(sum(shares, [])) == batch and [len(s) for s in shares] == [3, 2, 2]
    assert without_option(["train", "--nproc", "2", "--lr", "1"], "--nproc") == ["train", "--lr", "1"]
    assert without_option(["train", "--nproc=2"], "--nproc") == ["train"]


def test_ddp_registers_only_the_prefix(tmp_path):
    """The frozen base is neither broadcast nor synchronized: DDP holds the prefix parameters only."""
    import torch.distributed as dist
    from tiny import tiny_model

    from prefixtune import PrefixConfig, PrefixTunedModel
    from prefixtune.distributed import wrap_ddp

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = PrefixTunedModel.wrap(tiny_model("llama"), PrefixConfig(num_virtual_tokens=2, mid_dim=8))
        ddp = wrap_ddp(model, torch.device("cpu"))
        synced = {id(p) for p in ddp._module_parameters}
        assert synced == {id(p) for p in model.trainable_parameters()}
        assert all(f"base.{n}" in ddp.parameters_to_ignore for n, _ in model.base.named_parameters())
    finally:
        dist.destroy_process_group()


def test_auto_dtype_on_cpu_follows_the_cpus_bf16_instructions_else_a_measurement_made_once(tmp_path, monkeypatch):
    """``--dtype auto`` on a CPU: bf16 where the CPU has bf16 matrix instructions (AMX, AVX-512 BF16), fp32 where
    it has not (AVX2 only); where flags cannot be read, bf16 only if it measures at least 1.5× as fast as fp32,
    measured once per machine and remembered. The choice is said with its reason."""
    from prefixtune import hardware

    monkeypatch.setenv(hardware.ENV, "bf16")
    assert hardware.cpu_dtype(tmp_path) == ("bf16", "PREFIXTUNE_CPU_DTYPE=bf16")
    monkeypatch.setenv(hardware.ENV, "int8")
    with pytest.raises(PrefixTuneError, match="PREFIXTUNE_CPU_DTYPE must be fp32 or bf16"):
        hardware.cpu_dtype(tmp_path)
    monkeypatch.delenv(hardware.ENV)
    for flags, expected in (({"avx2", "amx_bf16", "amx_tile"}, "bf16"), ({"avx2", "avx512_bf16"}, "bf16")):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        assert hardware.cpu_dtype(tmp_path)[0] == expected
        assert resolve_dtype("auto", torch.device("cpu")) == expected
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "fma"})
    assert hardware.cpu_dtype(tmp_path) == ("fp32", "this CPU has no bf16 matrix instructions (AMX, AVX-512 BF16)")
    assert resolve_dtype("auto", torch.device("cpu")) == "fp32"

    calls = []

    def rates(bf16_speed):
        def rate(dtype, **kw):
            calls.append(dtype)
            return 100e9 * (bf16_speed if dtype == torch.bfloat16 else 1.0)

        return rate

    monkeypatch.setattr(hardware, "cpu_flags", lambda: None)
    for speed, expected in ((5.0, "bf16"), (1.2, "fp32"), (0.01, "fp32")):
        folder = tmp_path / str(speed)
        monkeypatch.setattr(hardware, "matmul_rate", rates(speed))
        assert hardware.cpu_dtype(folder)[0] == expected
        measured = len(calls)
        assert hardware.cpu_dtype(folder)[0] == expected and len(calls) == measured  # read back, not measured
    assert json.loads((tmp_path / "5.0" / hardware.CACHE_FILE).read_text())[hardware.cpu_key()]["dtype"] == "bf16"
    monkeypatch.setattr(hardware, "cpu_dtype", lambda: ("bf16", "this CPU has bf16 matrix instructions (amx_bf16)"))
    from prefixtune.distributed import dtype_note

    assert (
        dtype_note("auto", torch.device("cpu"))
        == "bf16 (--dtype auto: this CPU has bf16 matrix instructions (amx_bf16))"
    )
    assert dtype_note("fp32", torch.device("cpu")) == "fp32"
