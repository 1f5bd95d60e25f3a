"""prefixtune: Prefix-Tuning (Li & Liang, ACL 2021) for frozen Hugging Face models."""

from .base import DEFAULT_MODEL, load_base
from .config import PrefixConfig
from .errors import PrefixTuneError
from .generation import GenerationOptions
from .model import PrefixLMOutput, PrefixTunedModel

__version__ = "0.1.0"


def train(*args, **kwargs):
    """Train a prefix; see :func:`prefixtune.train.train`."""
    from .training import train as _train

    return _train(*args, **kwargs)


def distill(*args, **kwargs):
    """Distill a prompt into a prefix; see :func:`prefixtune.distill.distill`."""
    from .distill import distill as _distill

    return _distill(*args, **kwargs)


__all__ = [
    "DEFAULT_MODEL",
    "GenerationOptions",
    "PrefixConfig",
    "PrefixLMOutput",
    "PrefixTuneError",
    "PrefixTunedModel",
    "distill",
    "load_base",
    "train",
]
