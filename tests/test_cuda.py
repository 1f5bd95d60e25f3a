"""CUDA (issue 6, point 3): training and decoding on a GPU in bf16. Skipped where no GPU is present."""

import pytest
import torch
from paths import E2E
from tiny import make_model

from prefixtune import PrefixConfig
from prefixtune.distributed import resolve_device, resolve_dtype

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_auto_picks_the_gpu_and_bf16():
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert resolve_dtype("auto", device) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


def test_train_and_decode_on_cuda_in_bf16(tmp_path):
    from prefixtune.training import TrainConfig, train

    model, tok = make_model()
    base = model.base.to("cuda", torch.bfloat16)
    result = train(
        TrainConfig(
            output=str(tmp_path / "run"),
            data=str(E2E),
            task="e2e",
            train_size=16,
            dev_size=4,
            epochs=1,
            batch_size=4,
            lr=1e-2,
            device="cuda",
            dtype="bf16",
            prefix=PrefixConfig(num_virtual_tokens=4, mid_dim=32),
        ),
        base=(base, tok),
    )
    trained = result.model
    assert trained.device.type == "cuda" and trained.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trained.trainable_parameters())  # the prefix stays fp32
    assert torch.isfinite(torch.tensor(result.final_loss))
    ids = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]], device="cuda")
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]], device="cuda")
    for beams in (1, 3):
        out = trained.generate(ids, mask, num_beams=beams, max_new_tokens=6)
        assert out.device.type == "cuda" and out.shape[0] == 2
    trained.add_prefix("other", PrefixConfig(num_virtual_tokens=2))
    mixed = trained.generate(ids, mask, prefix=["default", "other"], max_new_tokens=4)
    assert mixed.shape[0] == 2
