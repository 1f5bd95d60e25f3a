import pytest
import torch
from tiny import make_model

from prefixtune import PrefixConfig


@pytest.fixture
def served(tmp_path):
    """A tiny model, its tokenizer and a prefix directory with three prefixes (a, b, c)."""
    model, tok = make_model()
    directory = tmp_path / "prefixes"
    torch.manual_seed(1)
    for name, length in (("a", 3), ("b", 6), ("c", 2)):
        model.add_prefix(name, PrefixConfig(num_virtual_tokens=length, init_std=0.5))
        model.save_prefix(directory / name, name=name)
        model.remove_prefix(name)
    return model, tok, directory
