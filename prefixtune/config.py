"""Configuration of one prefix (Li & Liang 2021, §4.2-4.3 and the §7.2 initialization)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields

from .errors import PrefixTuneError

MODES = ("kv", "embedding")


@dataclass
class PrefixConfig:
    """How one prefix is shaped, parameterized and initialized.

    Attributes:
        num_virtual_tokens: Prefix length P. ``None`` takes the token count of ``init_text``
            (or 10 without it).
        mode: ``"kv"`` trains keys and values at every layer (prefix-tuning); ``"embedding"`` trains
            only P input embeddings (the paper's embedding-only ablation, i.e. prompt tuning).
        reparameterize: Train through the paper's MLP, P' (P × d) → mid_dim → tanh → output.
            ``export`` ejects the MLP after training.
        mid_dim: Hidden width of the reparameterization MLP (paper: 512; 800 for XSUM).
        init_text: Initialize from the frozen model's own activations of this text (§7.2),
            tokenized without special tokens. ``None`` gives a random initialization.
        dropout: Dropout on the prefix during training.
        init_std: Standard deviation of a random flat initialization.
    """

    num_virtual_tokens: int | None = None
    mode: str = "kv"
    reparameterize: bool = True
    mid_dim: int = 512
    init_text: str | None = None
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        p = self.num_virtual_tokens
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p <= 0):
            raise PrefixTuneError(f"num_virtual_tokens must be a positive integer, got {p!r}")
        if self.mode not in MODES:
            raise PrefixTuneError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.mid_dim, int) or self.mid_dim <= 0:
            raise PrefixTuneError(f"mid_dim must be a positive integer, got {self.mid_dim!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise PrefixTuneError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init_text is not None and not self.init_text.strip():
            raise PrefixTuneError("init_text is empty; give real words or leave it unset")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PrefixConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PrefixTuneError(f"unknown prefix config field(s): {', '.join(unknown)}")
        return cls(**data)


def field_default(cls, name: str):
    """The default of dataclass field ``name``: where the CLI takes its defaults from (one place each)."""
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if field is None:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no default")
