"""Training (issue 2, points 9, 10, 16): loop, run directory, accumulation, kill -9 resume."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cli_args import train_command
from paths import E2E
from safetensors.torch import load_file
from tiny import save_tiny_model_dir, tiny_model, tiny_tokenizer

import prefixtune
from prefixtune import PrefixConfig, PrefixTuneError
from prefixtune.training import TrainConfig, read_log, train


def _base(family="llama"):
    tok = tiny_tokenizer()
    base = tiny_model(family)
    base.resize_token_embeddings(len(tok))
    return base, tok


def _cfg(tmp_path, name="run", **kw):
    defaults = dict(
        output=str(tmp_path / name),
        data=str(E2E),
        task="e2e",
        train_size=16,
        dev_size=8,
        epochs=2,
        batch_size=4,
        lr=1e-2,
        prefix=PrefixConfig(num_virtual_tokens=4, mid_dim=32),
    )
    defaults.update(kw)
    return TrainConfig(**defaults)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_run_directory_and_learning(tmp_path, family):
    base, tok = _base(family)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = prefixtune.train(_cfg(tmp_path, epochs=4), base=(base, tok))  # the public entry point
    run = Path(result.output)
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["prefix.safetensors", "prefix_config.json", "log.jsonl", "loss.png", "checkpoints", "train_config.json"]
    )
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = read_log(run)
    steps = [r for r in log if r["event"] == "step"]
    devs = [r for r in log if r["event"] == "dev"]
    assert len(steps) == 16 and len(devs) == 4  # 16 examples / batch 4 = 4 steps per epoch
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert devs[-1]["dev_loss"] < devs[0]["dev_loss"]
    doc = json.loads((run / "prefix_config.json").read_text())
    assert doc["training"]["best_dev_loss"] == min(d["dev_loss"] for d in devs)
    assert result.best_step == min(devs, key=lambda d: d["dev_loss"])["step"]
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_gradient_accumulation_gives_the_same_prefix(tmp_path):
    prefixes = []
    for accum in (1, 2):
        result = train(_cfg(tmp_path, f"acc{accum}", grad_accum=accum, dev_size=2, epochs=1), base=_base())
        prefixes.append(load_file(str(Path(result.output) / "prefix.safetensors"))["decoder"])
    torch.testing.assert_close(prefixes[0], prefixes[1], atol=1e-5, rtol=0)


def test_refuses_a_non_empty_output_without_resume(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("x")
    with pytest.raises(PrefixTuneError, match="not empty; pass --resume"):
        train(_cfg(tmp_path), base=_base())


def test_bad_input_writes_nothing(tmp_path):
    with pytest.raises(PrefixTuneError, match="not found"):
        train(_cfg(tmp_path, data=str(tmp_path / "missing.jsonl"), task="jsonl"), base=_base())
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny-llama")


def _cli_train(model_dir, output, *extra):
    return train_command(
        model_dir,
        output,
        *extra,
        train_size=600,
        dev_size=8,
        epochs=2,
        batch_size=2,
        lr="1e-2",
        checkpoint_every=25,
        num_virtual_tokens=4,
        mid_dim=32,
    )


def _steps(run):
    try:
        return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines() if '"step"' in line]
    except (OSError, json.JSONDecodeError):
        return []


def test_resume_after_kill_9_mid_epoch_ends_with_the_same_prefix(model_dir, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_cli_train(model_dir, whole), check=True, capture_output=True)
    proc = subprocess.Popen(_cli_train(model_dir, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and max(_steps(killed), default=0) < 160:  # epoch 1 is steps 1..300
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reached = max(_steps(killed))
    assert 160 <= reached < 300, "the kill must land mid-epoch"
    assert not (killed / "prefix.safetensors").exists()
    subprocess.run(_cli_train(model_dir, killed, "--resume"), check=True, capture_output=True)
    starts = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines() if '"start"' in line]
    assert starts[-1]["resumed"] and 150 <= starts[-1]["step"] <= reached
    a = load_file(str(whole / "prefix.safetensors"))
    b = load_file(str(killed / "prefix.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r for r in read_log(whole) if r["event"] == "dev"] == [r for r in read_log(killed) if r["event"] == "dev"]


def test_gradient_checkpointing_trains_the_same_prefix(tmp_path):
    prefixes = []
    for flag in (False, True):
        result = train(_cfg(tmp_path, f"gc{flag}", dev_size=2, epochs=1, gradient_checkpointing=flag), base=_base())
        prefixes.append(load_file(str(Path(result.output) / "prefix.safetensors"))["decoder"])
    torch.testing.assert_close(prefixes[0], prefixes[1], atol=1e-5, rtol=0)


def test_group_by_length_batches_cut_padding_and_cover_every_example():
    from prefixtune.training import batches

    lengths = [int(x) for x in torch.randint(5, 90, (1000,), generator=torch.Generator().manual_seed(0))]

    def padding(groups):
        return sum(max(lengths[i] for i in g) * len(g) - sum(lengths[i] for i in g) for g in groups)

    plain = batches(1000, 8, seed=1, epoch=0)
    grouped = batches(1000, 8, seed=1, epoch=0, lengths=lengths)
    assert sorted(i for g in grouped for i in g) == list(range(1000))
    assert len(grouped) == len(plain) and padding(grouped) < 0.2 * padding(plain)
    assert grouped != batches(1000, 8, seed=1, epoch=1, lengths=lengths)  # a new order every epoch
    assert grouped == batches(1000, 8, seed=1, epoch=0, lengths=lengths)  # reproducible (resume)


def test_group_by_length_trains(tmp_path):
    result = train(_cfg(tmp_path, group_by_length=True, epochs=1), base=_base())
    assert result.steps == 4 and (tmp_path / "run" / "prefix.safetensors").is_file()


def test_bf16_base_reaches_the_fp32_loss(tmp_path):
    """bf16 is honest: a bf16 base trains the (fp32) prefix to the same dev loss as fp32, within noise."""
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        base, tok = _base()
        result = train(
            _cfg(tmp_path, name=str(dtype), epochs=3, train_size=48, dev_size=16), base=(base.to(dtype), tok)
        )
        assert all(p.dtype == torch.float32 for p in result.model.trainable_parameters())
        losses[dtype] = result.best_dev_loss
    first = [r["dev_loss"] for r in read_log(tmp_path / str(torch.float32)) if r["event"] == "dev"][0]
    assert losses[torch.float32] < first  # it learned something
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], rel=0.02)


def test_train_prints_its_plan_and_shows_dev_progress(tmp_path, capsys):
    """A run says what it will do before it starts, and the dev evaluation has its own progress bar;
    by default the dev loss uses the first 500 dev examples, not E2E's whole dev split (4,672 rows)."""
    cfg = _cfg(tmp_path, train_size=16, epochs=1, batch_size=8, progress=True)
    cfg.dev_size = TrainConfig.__dataclass_fields__["dev_size"].default
    result = train(cfg, base=_base())
    err = capsys.readouterr().err
    assert "train: 16 examples, 2 steps of 8 (1 epoch of 2 steps)" in err
    assert "dev loss: 500 examples (the first 500 of 4,672;" in err
    assert "after every epoch (1 time, 63 batches each)" in err
    assert re.search(r"dev loss: +\d+%.*/63 \[", err)  # the dev evaluation has its own bar (cleared when done)
    start = next(r for r in read_log(result.output) if r["event"] == "start")
    assert start["dev_examples"] == 500


def test_dev_size_defaults_to_500_and_all_means_the_whole_split():
    from prefixtune.cli import build_parser

    assert TrainConfig(output="x", data="y").dev_size == 500
    parse = build_parser().parse_args
    assert parse(["train", "--output", "x"]).dev_size == 500
    assert parse(["train", "--output", "x", "--dev-size", "all"]).dev_size is None
    assert parse(["train", "--output", "x", "--dev-size", "40"]).dev_size == 40
    with pytest.raises(SystemExit):
        parse(["train", "--output", "x", "--dev-size", "0"])
    with pytest.raises(PrefixTuneError, match="dev_size must be ≥ 1"):
        TrainConfig(output="x", data="y", dev_size=0)


def test_the_train_cli_takes_its_defaults_from_the_config_dataclasses(monkeypatch):
    """One place for each default: TrainConfig and PrefixConfig; the CLI reads them."""
    import dataclasses

    from prefixtune.cli import build_parser
    from prefixtune.cli.train import resolve

    args = build_parser().parse_args(["train", "--output", "x"])
    cfg, prefix = TrainConfig(output="x", data="y"), PrefixConfig()
    for name in ("subset_seed", "dev_size", "grad_accum", "warmup_steps", "weight_decay", "max_grad_norm", "seed"):
        assert getattr(args, name) == getattr(cfg, name), name
    assert (args.checkpoint_every, args.mode, args.dropout) == (cfg.checkpoint_every, prefix.mode, prefix.dropout)
    values = resolve(args)  # no flag, no preset: the dataclasses' values
    assert (values["lr"], values["epochs"], values["batch_size"]) == (cfg.lr, cfg.epochs, cfg.batch_size)
    assert values["mid_dim"] == prefix.mid_dim
    # change a dataclass default and the CLI follows
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    monkeypatch.setattr(fields["seed"], "default", 7)
    assert build_parser().parse_args(["train", "--output", "x"]).seed == 7


def test_micro_batches_hold_examples_of_similar_length():
    from prefixtune.batching import passes
    from prefixtune.distributed import Dist
    from prefixtune.features import Features

    lengths = [9, 3, 7, 1, 8, 2, 6, 4]
    batch = [Features(list(range(n)), [-100] * (n - 1) + [5]) for n in lengths]
    one = passes(batch, Dist(), 4, 8)
    assert [[len(f.input_ids) for f in mb] for mb, _ in one] == [[1, 2, 3, 4], [6, 7, 8, 9]]  # padded to 4 and 9
    assert all(w == 1 / 8 for _, w in one)
    whole = passes(batch, Dist(), 8, 8)  # not split: the batch as it came
    assert [len(f.input_ids) for f in whole[0][0]] == lengths
    two = passes(batch, Dist(rank=1, world_size=2, local_rank=1), 2, 8)  # rank 1's share: 3, 1, 2, 4
    assert [[len(f.input_ids) for f in mb] for mb, _ in two] == [[1, 2], [3, 4]]
    assert all(w == 2 / 8 for _, w in two)
