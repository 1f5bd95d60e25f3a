"""Prefix folders (issue 2, points 3, 8d, 10): ejection, exact round trips, clear errors."""

import json

import pytest
import torch
from tiny import ALL, tiny_model

from prefixtune import PrefixConfig, PrefixTunedModel, PrefixTuneError
from prefixtune.files import CONFIG, WEIGHTS, fingerprint, write_lines


def _trained(family, mode="kv"):
    torch.manual_seed(0)
    model = PrefixTunedModel.wrap(tiny_model(family), PrefixConfig(num_virtual_tokens=4, mid_dim=16, mode=mode))
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    ids = torch.tensor([[5, 6, 7, 8]])
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _logits(model, name=None):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        return model(ids, labels=ids, prefix=name).logits


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("mode", ["kv", "embedding"])
def test_8d_eject_keeps_logits_and_save_load_round_trips_exactly(family, mode, tmp_path):
    model = _trained(family, mode)
    before = _logits(model)
    model.eject_mlp("default")
    assert not any(part.reparameterized for part in model.get_prefix("default").parts.values())
    torch.testing.assert_close(_logits(model), before, atol=1e-6, rtol=0)
    model.save_prefix(tmp_path / "p", name="default", metadata={"steps": 2})
    assert sorted(f.name for f in (tmp_path / "p").iterdir()) == sorted([CONFIG, WEIGHTS])
    fresh = PrefixTunedModel(model.base)
    loaded = fresh.load_prefix(tmp_path / "p", name="x")
    for name, value in model.get_prefix("default").flat_state().items():
        assert torch.equal(loaded.flat_state()[name], value)
    assert torch.equal(_logits(fresh, "x"), _logits(model))
    document = json.loads((tmp_path / "p" / CONFIG).read_text())
    assert document["training"] == {"reparameterized": False, "steps": 2}  # ejected before saving
    assert document["base_model"]["fingerprint"] == fingerprint(model.base)
    assert document["num_virtual_tokens"] == 4 and document["mode"] == mode


def test_saving_a_reparameterized_prefix_writes_only_the_flat_tensors(tmp_path):
    model = _trained("llama")
    model.save_prefix(tmp_path / "p")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "p" / WEIGHTS))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"decoder": (4, 2, 2, 2, 8)}
    assert model.get_prefix("default").parts["decoder"].reparameterized  # saving does not eject the live model


def test_loading_onto_another_base_names_both(tmp_path):
    model = _trained("llama")
    model.save_prefix(tmp_path / "p")
    other = PrefixTunedModel(tiny_model("llama", seed=1))
    with pytest.raises(PrefixTuneError, match="trained on base model .* but the loaded base model is"):
        other.load_prefix(tmp_path / "p")


def test_fingerprint_is_dtype_independent_and_weight_sensitive():
    base = tiny_model("gpt2")
    fp = fingerprint(base)
    assert fingerprint(tiny_model("gpt2").to(torch.bfloat16)) == fp
    assert fingerprint(tiny_model("gpt2", seed=5)) != fp


@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_config", "missing_weights", "wrong_shape"])
def test_corrupted_files_give_clear_errors(damage, tmp_path):
    model = _trained("gpt2")
    path = tmp_path / "p"
    model.save_prefix(path)
    if damage == "truncate_weights":
        data = (path / WEIGHTS).read_bytes()
        (path / WEIGHTS).write_bytes(data[: len(data) // 2])
        match = "corrupted or truncated safetensors"
    elif damage == "garbage_config":
        (path / CONFIG).write_text('{"format": "prefixtune-prefix", "ba')
        match = "corrupted or truncated JSON"
    elif damage == "missing_weights":
        (path / WEIGHTS).unlink()
        match = "prefix.safetensors: missing"
    else:
        doc = json.loads((path / CONFIG).read_text())
        doc["parts"]["decoder"][0] = 9
        (path / CONFIG).write_text(json.dumps(doc))
        match = "do not match"
    with pytest.raises(PrefixTuneError, match=match):
        PrefixTunedModel(model.base).load_prefix(path)


def test_not_a_prefix_folder(tmp_path):
    with pytest.raises(PrefixTuneError, match="not a prefix folder"):
        PrefixTunedModel(tiny_model("gpt2")).load_prefix(tmp_path / "nothing")


def test_prediction_files_keep_one_line_per_text_whatever_breaks_a_model_emits(tmp_path):
    texts = ["a\nb", "c\r\nd", "e\u2028f", "g\x1eh\x0bi", "", "Café"]
    write_lines(tmp_path / "pred.txt", texts)
    lines = (tmp_path / "pred.txt").read_text(encoding="utf-8").splitlines()
    assert lines == ["a b", "c d", "e f", "g h i", "", "Café"]
