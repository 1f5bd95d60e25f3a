"""The command line (issue 2, points 14 and 16): help, commands, one-line errors, non-zero exits."""

import json
import subprocess
import sys

import pytest
import torch
from cli_args import train_args
from paths import E2E
from safetensors.torch import load_file
from tiny import save_tiny_model_dir

from prefixtune.checkpoint import load_checkpoint
from prefixtune.cli import build_parser, main

TRAIN_FLAGS = [
    "--model",
    "--task",
    "--data",
    "--train-size",
    "--output",
    "--resume",
    "--epochs",
    "--max-steps",
    "--batch-size",
    "--lr",
    "--seed",
    "--num-virtual-tokens",
    "--init-text",
    "--compile",
    "--mode",
    "--no-reparameterize",
    "--mid-dim",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("m") / "tiny-llama")


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("m2") / "other-llama", seed=7)


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    code = main(
        train_args(model_dir, out, train_size=8, dev_size=4, max_steps=3, batch_size=4, init_text="table-to-text:")
    )
    assert code == 0
    return out


def test_train_help_explains_every_option():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in TRAIN_FLAGS:
        assert flag in help_text
    actions = build_parser()._subparsers._group_actions[0].choices["train"]._actions
    assert all(a.help for a in actions)


def test_installed_command_runs():
    out = subprocess.run([sys.executable, "-m", "prefixtune", "--help"], capture_output=True, text=True, check=True)
    for command in ("train", "generate", "export", "inspect"):
        assert command in out.stdout


def test_generate_from_stdin_file_and_split(run_dir, tmp_path, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("name : The Vaults | eatType : pub\nname : The Mill\n"))
    assert main(["generate", "--prefix", str(run_dir), "--max-new-tokens", "3", "--no-progress"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    out = tmp_path / "pred.txt"
    assert (
        main(
            [
                "generate",
                "--prefix",
                str(run_dir),
                "--task",
                "e2e",
                "--data",
                str(E2E),
                "--split",
                "dev",
                "--max-new-tokens",
                "2",
                "--batch-size",
                "64",
                "--num-beams",
                "2",
                "--no-progress",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert len(out.read_text().splitlines()) == 547  # one line per unique dev MR


def test_generate_decode_weights_reach_the_model_and_keep_the_outputs(run_dir, monkeypatch, capsys):
    import io

    from prefixtune import decode

    seen = []
    decode_texts = decode.decode_texts
    monkeypatch.setattr(
        decode, "decode_texts", lambda model, *a, **k: seen.append(model.decode_weights) or decode_texts(model, *a, **k)
    )
    outputs = []
    for mode in ("off", "packed", "plain"):
        monkeypatch.setattr(sys, "stdin", io.StringIO("name : The Vaults | eatType : pub\nname : The Mill\n"))
        args = ["generate", "--prefix", str(run_dir), "--max-new-tokens", "4", "--num-beams", "2", "--no-progress"]
        assert main(args + ["--decode-weights", mode]) == 0
        outputs.append(capsys.readouterr().out)
    assert seen == ["off", "packed", "plain"]
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0].splitlines()) == 2
    with pytest.raises(SystemExit):
        main(["generate", "--prefix", str(run_dir), "--decode-weights", "fast"])


def test_train_reports_the_best_dev_loss_and_its_step(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(model_dir, out, train_size=8, dev_size=4, max_steps=4, batch_size=4)) == 0
    devs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    best = min((r for r in devs if r["event"] == "dev"), key=lambda r: r["dev_loss"])
    assert f"best dev loss {best['dev_loss']:.4f} at step {best['step']};" in capsys.readouterr().err


def test_inspect_json(run_dir, capsys):
    assert main(["inspect", str(run_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_virtual_tokens"] == 12 and info["mode"] == "kv"
    assert info["parameters"] == 12 * 2 * 2 * 2 * 8
    assert info["training"]["steps"] == 3 and len(info["base_fingerprint"]) == 16


def test_export_from_checkpoint_ejects_the_mlp(run_dir, tmp_path):
    out = tmp_path / "flat"
    assert main(["export", str(run_dir), str(out)]) == 0
    flat = load_file(str(out / "prefix.safetensors"))["decoder"]
    state = load_checkpoint(run_dir)["prefix"]
    emb, w1, b1 = (
        state["parts.decoder.embedding"],
        state["parts.decoder.mlp.0.weight"],
        state["parts.decoder.mlp.0.bias"],
    )
    w2, b2 = state["parts.decoder.mlp.2.weight"], state["parts.decoder.mlp.2.bias"]
    want = (torch.tanh(emb @ w1.T + b1) @ w2.T + b2).view(flat.shape)
    torch.testing.assert_close(flat, want)


def _error(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("prefixtune: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_inputs_give_one_line_errors_and_write_nothing(model_dir, tmp_path, capsys):
    base = ["train", "--model", model_dir, "--task", "jsonl", "--no-progress", "--output", str(tmp_path / "o")]
    assert "missing.jsonl: data file not found" in _error(capsys, base + ["--data", str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty.jsonl: file is empty" in _error(capsys, base + ["--data", str(tmp_path / "empty.jsonl")])
    (tmp_path / "long.jsonl").write_text(json.dumps({"source": "word " * 600, "target": "x"}) + "\n")
    assert "long.jsonl:1:" in _error(capsys, base + ["--data", str(tmp_path / "long.jsonl")])
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"source": "a b", "target": "c"}) + "\n")
    unknown = ["train", "--model", str(tmp_path / "no-such-model"), "--data", str(ok), "--output", str(tmp_path / "o")]
    assert "unknown model" in _error(capsys, unknown)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags, message", [(["--num-virtual-tokens", "0"], "must be > 0"), (["--mode", "lora"], "invalid choice")]
)
def test_invalid_prefix_flags_exit_non_zero(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "x", "--output", str(tmp_path / "o"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_truncate_flag_allows_long_inputs(model_dir, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"source": "word " * 600, "target": "x"}) + "\n")
    assert (
        main(
            [
                "train",
                "--model",
                model_dir,
                "--data",
                str(data),
                "--max-steps",
                "1",
                "--truncate",
                "--no-progress",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )


def test_prefix_from_another_base_model_is_refused(run_dir, other_model_dir, tmp_path, capsys):
    (tmp_path / "in.txt").write_text("name : The Vaults\n")
    err = _error(
        capsys,
        [
            "generate",
            "--prefix",
            str(run_dir),
            "--model",
            other_model_dir,
            "--input",
            str(tmp_path / "in.txt"),
            "--no-progress",
        ],
    )
    assert "tiny-llama" in err and "other-llama" in err
