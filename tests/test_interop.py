"""PEFT interoperability (issue 6, point 4): real PEFT checkpoints in and out, identical logits both ways."""

import json

import pytest
import torch
from tiny import save_tiny_model_dir, tiny_model

from prefixtune import PrefixConfig, PrefixTunedModel, PrefixTuneError
from prefixtune.cli import main
from prefixtune.interop import PEFT_CONFIG, PEFT_WEIGHTS, export_peft, import_peft

peft = pytest.importorskip("peft")

IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def _peft_model(family, seed=0):
    """A PEFT prefix-tuning model with a random (non-zero) prefix through PEFT's MLP."""
    torch.manual_seed(seed)
    config = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16
    )
    model = peft.get_peft_model(tiny_model(family), config)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def _peft_logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _our_logits(model, name=None):
    with torch.no_grad():
        return model(IDS, prefix=name).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_import_peft_gives_identical_logits(family, tmp_path):
    theirs = _peft_model(family)
    theirs.save_pretrained(tmp_path / "peft")
    ours = PrefixTunedModel(tiny_model(family))
    prefix = import_peft(ours, tmp_path / "peft", name="imported")
    assert prefix.num_tokens == 3
    torch.testing.assert_close(_our_logits(ours, "imported"), _peft_logits(theirs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_peft_loads_in_peft_with_identical_logits(family, tmp_path):
    torch.manual_seed(1)
    ours = PrefixTunedModel.wrap(tiny_model(family), PrefixConfig(num_virtual_tokens=4, mid_dim=16))
    with torch.no_grad():
        for p in ours.trainable_parameters():
            p.normal_(0, 0.5)
    ours.eval()
    ours.save_prefix(tmp_path / "ours")
    export_peft(tmp_path / "ours", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 4
    theirs = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "peft").eval()
    expected = _our_logits(ours)
    with torch.no_grad():
        assert not torch.allclose(expected, tiny_model(family)(input_ids=IDS).logits, atol=1e-3)  # the prefix matters
    torch.testing.assert_close(_peft_logits(theirs), expected, atol=1e-5, rtol=1e-5)
    # and back again: the same tensors
    back = PrefixTunedModel(tiny_model(family))
    import_peft(back, tmp_path / "peft")
    assert torch.equal(
        back.get_prefix("default").flat_state()["decoder"], ours.get_prefix("default").flat_state()["decoder"]
    )


def test_cli_round_trip_and_clear_errors(tmp_path, capsys):
    model_dir = save_tiny_model_dir(tmp_path / "tiny-llama")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    theirs.save_pretrained(tmp_path / "peft")
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "prefix"), "--model", model_dir]) == 0
    assert main(["export-peft", str(tmp_path / "prefix"), str(tmp_path / "peft2")]) == 0
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "peft" / PEFT_WEIGHTS))["prompt_embeddings"]
    b = load_file(str(tmp_path / "peft2" / PEFT_WEIGHTS))["prompt_embeddings"]
    assert torch.equal(a, b)
    assert json.loads((tmp_path / "peft2" / PEFT_CONFIG).read_text())["base_model_name_or_path"] == model_dir

    # Bad inputs: one line naming the file or field, non-zero exit, nothing written.
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / PEFT_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    capsys.readouterr()
    assert main(["import-peft", str(tmp_path / "lora"), str(tmp_path / "out"), "--model", model_dir]) == 2
    err = capsys.readouterr().err
    assert "peft_type" in err and "LORA" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    (tmp_path / "peft" / PEFT_WEIGHTS).write_bytes(b"garbage")
    assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "out"), "--model", model_dir]) == 2
    assert "adapter_model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_checkpoint_of_another_geometry(tmp_path):
    _peft_model("llama").save_pretrained(tmp_path / "peft")
    with pytest.raises(PrefixTuneError, match="num_layers, num_attention_heads, token_dim"):
        import_peft(PrefixTunedModel(tiny_model("gpt2")), tmp_path / "peft")


@pytest.mark.parametrize("family, mode", [("bart", "kv"), ("llama", "embedding")])
def test_export_refuses_what_peft_cannot_hold(family, mode, tmp_path):
    ours = PrefixTunedModel.wrap(tiny_model(family), PrefixConfig(num_virtual_tokens=2, mode=mode))
    ours.save_prefix(tmp_path / "p")
    with pytest.raises(PrefixTuneError, match="encoder-decoder|mode"):
        export_peft(tmp_path / "p", tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
