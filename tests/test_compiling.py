"""--compile: each layer of the base compiled in place gives the eager loss, gradients and prefix."""

import pytest
import torch
from paths import E2E
from tiny import make_model

from prefixtune import PrefixConfig, PrefixTuneError
from prefixtune.compiling import compile_layers, uncompile_layers
from prefixtune.features import Formatter, collate, context_length
from prefixtune.training import TrainConfig, train


def _batch(tok, model, n_tokens):
    from prefixtune.data import load_examples

    fmt = Formatter(tok, False, context_length(model.base.config), n_tokens)
    return [collate([fmt.encode(e) for e in load_examples("e2e", E2E, "train")[k : k + 3]], 0) for k in (0, 3)]


def test_compiled_layers_give_eager_loss_and_gradients():
    model, tok = make_model()
    model.add_prefix("p", PrefixConfig(num_virtual_tokens=4, mid_dim=16))
    model.train()
    batches = _batch(tok, model, 4)  # two batches of different lengths: the dynamic-shape path too

    def loss_and_grads(b):
        model.zero_grad(set_to_none=True)
        loss = model(**b, prefix="p", loss_only=True).loss
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.trainable_parameters()]

    eager = [loss_and_grads(b) for b in batches]
    assert compile_layers(model) == 2
    assert all(getattr(m, "_compiled_call_impl", None) is not None for m in model.base.model.layers)
    compiled = [loss_and_grads(b) for b in batches]
    for (l1, g1), (l2, g2) in zip(eager, compiled):
        assert abs(l1 - l2) < 1e-5
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert [n for n, _ in model.base.named_parameters()] == [n for n, _ in make_model()[0].base.named_parameters()]
    uncompile_layers(model)
    assert all(m._compiled_call_impl is None for m in model.base.model.layers)


def test_train_with_compile_matches_eager(tmp_path):
    runs = {}
    for compile_ in (False, True):
        model, tok = make_model()
        result = train(
            TrainConfig(
                output=str(tmp_path / f"run-{compile_}"),
                data=str(E2E),
                task="e2e",
                train_size=12,
                dev_size=4,
                max_steps=3,
                batch_size=4,
                lr=1e-2,
                device="cpu",
                compile=compile_,
                prefix=PrefixConfig(num_virtual_tokens=4, mid_dim=16),
            ),
            base=(model.base, tok),
        )
        runs[compile_] = result
    assert abs(runs[True].final_loss - runs[False].final_loss) < 1e-4
    assert abs(runs[True].best_dev_loss - runs[False].best_dev_loss) < 1e-4
    # the returned model is eager again: decoding does not recompile
    assert all(m._compiled_call_impl is None for m in runs[True].model.base.model.layers)


@pytest.mark.parametrize("other", ["fsdp", "gradient_checkpointing"])
def test_compile_refuses_untested_combinations(other):
    with pytest.raises(PrefixTuneError, match=f"compile cannot be combined with {other}"):
        TrainConfig(output="x", data="y", compile=True, **{other: True})
