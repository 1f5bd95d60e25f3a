"""Paper presets (issue 3, point 4): values, and explicit flags override them."""

import argparse

import pytest

from prefixtune.cli import build_parser
from prefixtune.cli.train import resolve
from prefixtune.presets import PRESETS, decoding_for


def _args(*argv):
    return build_parser().parse_args(["train", "--output", "x", *argv])


@pytest.mark.parametrize(
    "preset, lr, epochs, batch, tokens, mid",
    [
        ("e2e", 8e-5, 5, 10, 5, 512),
        ("webnlg", 5e-5, 5, 5, 5, 512),
        ("dart", 5e-5, 10, 5, 10, 512),
        ("xsum", 5e-5, 30, 14, 100, 800),
    ],
)
def test_paper_values(preset, lr, epochs, batch, tokens, mid):
    v = resolve(_args("--preset", preset))
    assert (v["lr"], v["epochs"], v["batch_size"], v["num_virtual_tokens"], v["mid_dim"]) == (
        lr,
        epochs,
        batch,
        tokens,
        mid,
    )
    assert v["task"] == preset


def test_explicit_flags_override_the_preset():
    v = resolve(_args("--preset", "e2e", "--lr", "1e-3", "--batch-size", "3", "--num-virtual-tokens", "7"))
    assert (v["lr"], v["batch_size"], v["num_virtual_tokens"], v["epochs"]) == (1e-3, 3, 7, 5)


@pytest.mark.parametrize("size, steps", [(50, 200), (100, 200), (200, 200), (500, 400)])
def test_lowdata_max_steps_by_size(size, steps):
    v = resolve(_args("--preset", "lowdata", "--train-size", str(size)))
    assert v["max_steps"] == steps and v["init_text"] == "table-to-text:" and v["lr"] == 5e-5 and v["batch_size"] == 10
    assert v["task"] == "e2e"
    assert resolve(_args("--preset", "lowdata", "--train-size", str(size), "--max-steps", "7"))["max_steps"] == 7


def test_decoding_settings():
    assert decoding_for("e2e") == {"num_beams": 5, "max_new_tokens": 100}
    assert decoding_for("xsum") == {"num_beams": 6, "max_new_tokens": 62, "length_penalty": 0.8}
    assert decoding_for(None, "xsum") == PRESETS["xsum"].decoding


def test_no_preset_keeps_the_builtin_defaults():
    v = resolve(_args())
    assert (v["lr"], v["epochs"], v["batch_size"], v["task"], v["max_steps"]) == (5e-5, 5, 8, "jsonl", None)
    assert isinstance(_args(), argparse.Namespace)
