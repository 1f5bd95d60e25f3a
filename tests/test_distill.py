"""prefixtune distill: a prompt compressed into a prefix, on tiny models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from prefixtune import PrefixTunedModel, PrefixTuneError
from prefixtune.distill import (
    TEACHER,
    Distillation,
    DistillConfig,
    add_prompt_prefix,
    distill,
    initial_prefix,
    kl_per_token,
    prompt_tokens,
    prompt_values,
    read_inputs,
    target_logits,
)
from prefixtune.features import Features
from tests.tiny import make_model, save_tiny_model_dir, tiny_model, tiny_tokenizer

PROMPT = "table-to-text: name : The Vaults | eatType : pub | near : Café Adriatic. The Vaults pub near Café Adriatic."
SOURCES = [
    "name : The Vaults | eatType : pub",
    "food : English | area : riverside",
    "priceRange : more than £30 | near : Café Adriatic",
    "familyFriendly : yes | customer rating : low",
    "name : The Vaults | food : English",
    "area : riverside | eatType : pub | priceRange : more than £30",
]


def _base(family="llama", seed=0):
    tok = tiny_tokenizer()
    base = tiny_model(family, seed=seed)
    base.resize_token_embeddings(len(tok))
    return base, tok


def _literal_teacher_logits(model: PrefixTunedModel, prompt_ids, source_ids, continuation):
    """The plain base model with the prompt's tokens in front: logits predicting the continuation."""
    ids = torch.tensor([prompt_ids + source_ids + continuation])
    logits = model.base(input_ids=ids).logits[0].float()
    start = len(prompt_ids) + len(source_ids) - 1
    return logits[start : start + len(continuation)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_prompt_held_as_a_prefix_is_the_prompt_in_front(family):
    model, tok = make_model(family=family)
    job = Distillation(model, tok, PROMPT, max_new_tokens=6)
    sources = job.source_ids(SOURCES[:3])
    continuations = job.continuations(sources, batch_size=2)
    features = job.features(sources, continuations)
    assert features, "the teacher continued at least one input"
    batch = job.batch(features)
    with torch.no_grad():
        held = job.teacher_logits(batch)
        literal = torch.cat(
            [_literal_teacher_logits(model, job.prompt_ids, s, c) for s, c in zip(sources, continuations) if c]
        )
    torch.testing.assert_close(held, literal, atol=2e-5, rtol=1e-4)
    # The cached continuations are the literal model's own greedy choices.
    assert torch.equal(literal.argmax(-1), torch.tensor([t for c in continuations for t in c]))


def test_a_prefix_of_the_prompts_own_length_starts_with_kl_zero(tmp_path):
    base, tok = _base()
    n = len(prompt_tokens(tok, PROMPT))
    result = distill(
        DistillConfig(
            output=str(tmp_path / "run"),
            prompt=PROMPT,
            inputs=SOURCES,
            num_virtual_tokens=n,
            init="first",
            max_new_tokens=6,
            steps=2,
            batch_size=3,
            dtype="fp32",
            device="cpu",
        ),
        base=(base, tok),
    )
    steps = [json.loads(line) for line in (result.output / "log.jsonl").read_text().splitlines()]
    first = next(r for r in steps if r["event"] == "step")
    assert abs(first["loss"]) < 1e-6
    # And against the literal teacher (prompt tokens in front, no prefix machinery), token by token.
    job = Distillation(result.model, tok, PROMPT, 6)
    for s, c in zip(job.source_ids(SOURCES[:2]), [[5, 9, 11], [7, 7]]):
        literal = _literal_teacher_logits(job.model, job.prompt_ids, s, c)
        with torch.no_grad():
            student = target_logits(job.model, job.batch([Features(s + c, [-100] * len(s) + c)]), "default")
        assert float(kl_per_token(literal, student).max()) < 1e-5  # a zero gradient left it where it started


def test_the_objective_decreases_and_the_output_is_an_ordinary_prefix(tmp_path):
    base, tok = _base()
    result = distill(
        DistillConfig(
            output=str(tmp_path / "run"),
            prompt=PROMPT,
            inputs=SOURCES,
            num_virtual_tokens=4,
            init="pool",
            max_new_tokens=8,
            steps=40,
            batch_size=3,
            lr=3e-2,
            dtype="fp32",
            device="cpu",
        ),
        base=(base, tok),
    )
    records = [json.loads(line) for line in (result.output / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "step"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    # An ordinary prefix folder: the model loads it as any trained prefix.
    fresh = PrefixTunedModel(_base()[0], tok)
    prefix = fresh.load_prefix(result.output, name="distilled")
    assert prefix.num_tokens == 4
    saved = load_file(str(result.output / "prefix.safetensors"))
    torch.testing.assert_close(saved["decoder"], result.model.get_prefix("default").flat_state()["decoder"])
    config = json.loads((result.output / "prefix_config.json").read_text())
    assert config["training"]["distilled"]["prompt_tokens"] == len(prompt_tokens(tok, PROMPT))
    teacher = [json.loads(line) for line in (result.output / "teacher.jsonl").read_text().splitlines()]
    assert teacher[0]["inputs"] == len(SOURCES) and len(teacher) == len(SOURCES) + 1


def test_initializations_from_the_prompts_keys_and_values():
    model, tok = make_model()
    ids = prompt_tokens(tok, PROMPT)
    values = prompt_values(model, ids)
    assert values.shape[0] == len(ids)
    first = initial_prefix(values, 3, "first")
    assert torch.equal(first, values[:3])
    pooled = initial_prefix(values, 3, "pool")
    chunks = torch.tensor_split(values, 3)
    assert pooled.shape == first.shape
    torch.testing.assert_close(pooled[1], chunks[1].mean(0))
    assert torch.equal(initial_prefix(values, len(ids), "pool"), values)  # P = N: the prompt itself
    assert initial_prefix(values, 3, "random") is None
    with pytest.raises(PrefixTuneError, match="exceeds the prompt"):
        initial_prefix(values, len(ids) + 1, "first")


def test_encoder_decoder_models_and_bad_inputs_are_refused_with_reasons(tmp_path):
    model, tok = make_model(family="bart")
    with pytest.raises(PrefixTuneError, match="decoder-only"):
        add_prompt_prefix(model, TEACHER, [5, 6, 7])
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"source": "ok"}\n{"target": "no source"}\n')
    with pytest.raises(PrefixTuneError, match=r"in.jsonl:2: needs a non-empty string field 'source'"):
        read_inputs(bad)
    good = tmp_path / "good.jsonl"
    good.write_text('{"source": "a", "target": "ignored"}\n\n{"source": "b"}\n')
    assert read_inputs(good) == ["a", "b"]
    for field, value in [("num_virtual_tokens", 0), ("init", "mean"), ("steps", 0), ("lr", 0.0), ("prompt", " ")]:
        kwargs = {"output": str(tmp_path / "x"), "prompt": PROMPT, "inputs": SOURCES, field: value}
        with pytest.raises(PrefixTuneError, match=field if field != "prompt" else "prompt is empty"):
            DistillConfig(**kwargs)


def _steps(run):
    log = run / "log.jsonl"
    if not log.is_file():
        return []
    out = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") == "step":
            out.append(record["step"])
    return out


def _cli(model_dir, prompt, inputs, output, *extra):
    return [
        sys.executable,
        "-m",
        "prefixtune",
        "distill",
        "--model",
        model_dir,
        "--prompt",
        str(prompt),
        "--inputs",
        str(inputs),
        "--output",
        str(output),
        "--num-virtual-tokens",
        "4",
        "--max-new-tokens",
        "6",
        "--steps",
        "400",
        "--batch-size",
        "2",
        "--checkpoint-every",
        "25",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def test_a_killed_distillation_resumes_to_the_same_prefix(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "tiny-llama")
    prompt, inputs = tmp_path / "prompt.txt", tmp_path / "inputs.jsonl"
    prompt.write_text(PROMPT)
    inputs.write_text("".join(json.dumps({"source": s}) + "\n" for s in SOURCES * 3))
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    env = {**os.environ, "PREFIXTUNE_CPU_DTYPE": "fp32"}
    subprocess.run(_cli(model_dir, prompt, inputs, whole), check=True, capture_output=True, env=env)
    proc = subprocess.Popen(
        _cli(model_dir, prompt, inputs, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.time() + 120
    while time.time() < deadline and max(_steps(killed), default=0) < 160:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reached = max(_steps(killed))
    assert 160 <= reached < 400, "the kill must land mid-run"
    assert not (killed / "prefix.safetensors").exists()
    teacher_before = (killed / "teacher.jsonl").read_text()
    subprocess.run(_cli(model_dir, prompt, inputs, killed, "--resume"), check=True, capture_output=True, env=env)
    assert (killed / "teacher.jsonl").read_text() == teacher_before  # reused, not generated again
    starts = [json.loads(line) for line in (killed / "log.jsonl").read_text().splitlines() if '"start"' in line]
    assert 150 <= starts[-1]["step"] <= reached
    a = load_file(str(whole / "prefix.safetensors"))
    b = load_file(str(killed / "prefix.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _steps(killed) == list(range(1, 401))
    # Without --resume, a used folder is refused.
    again = subprocess.run(_cli(model_dir, prompt, inputs, killed), capture_output=True, text=True, env=env)
    assert again.returncode == 2 and "not empty" in again.stderr
