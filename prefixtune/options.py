"""Decoding options, declared once.

:class:`GenerationOptions` is the only declaration of what decoding can be asked to do. The Python
API takes it (or its fields as keywords), the ``generate``/``train`` CLI flags are made from its
fields (:func:`add_flags`), the server's HTTP bodies — and so their OpenAPI schema — are made from it
(:func:`pydantic_fields`), and the engine carries one per request. Each field's bounds live here, next
to its default and its help text.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, asdict, dataclass, field, fields

from .errors import PrefixTuneError

MAX_SEED = 2**63 - 1


def _option(default, help: str, ge=None, gt=None, le=None, flag: bool = True, http: bool = True):
    return field(default=default, metadata={"help": help, "ge": ge, "gt": gt, "le": le, "flag": flag, "http": http})


@dataclass
class GenerationOptions:
    """Decoding options (names as in Hugging Face ``generate``)."""

    max_new_tokens: int = _option(64, "most new tokens per input", ge=1, le=100_000)
    min_new_tokens: int = _option(0, "end of sequence is forbidden before this many new tokens", ge=0, le=100_000)
    num_beams: int = _option(1, "beam width; 1 is greedy decoding (or sampling)", ge=1, le=64)
    do_sample: bool = _option(False, "sample instead of taking the most likely token")
    temperature: float = _option(1.0, "softmax temperature when sampling", ge=1e-4, le=100.0)
    top_k: int = _option(0, "sample among the k most likely tokens (0 = all)", ge=0, le=1_000_000)
    top_p: float = _option(1.0, "nucleus sampling: smallest set of tokens with this much mass", gt=0.0, le=1.0)
    repetition_penalty: float = _option(
        1.0, "divide the scores of tokens already present (prompt included) by this (CTRL; 1 = off)", gt=0.0, le=100.0
    )
    length_penalty: float = _option(1.0, "beam search: final scores are divided by length ** this", ge=-100.0, le=100.0)
    no_repeat_ngram_size: int = _option(0, "forbid repeating any n-gram of this size (0 = off)", ge=0, le=1_000)
    early_stopping: bool = _option(False, "beam search: stop as soon as num_beams hypotheses are finished")
    seed: int | None = _option(
        None, "seed for sampling (unset: 0 offline, the request's number in the server)", ge=0, le=MAX_SEED
    )
    stop: list[str] | None = _option(None, "cut the output before the first of these strings")
    eos_token_id: int | list[int] | None = _option(None, "token id(s) that end a row", flag=False, http=False)
    pad_token_id: int | None = _option(None, "fills rows after they end", flag=False, http=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", "float", "int | None") and value is not None:
                check(f.name, value)
        if self.stop is not None and not all(isinstance(s, str) for s in self.stop):
            raise PrefixTuneError("stop must be a string or a list of strings")
        if self.do_sample and self.num_beams > 1:
            raise PrefixTuneError("do_sample with num_beams > 1 (beam sampling) is not supported: use one or the other")

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerationOptions:
        unknown = set(kwargs) - {f.name for f in fields(cls)}
        if unknown:
            raise PrefixTuneError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """The options as JSON-ready values (what a run's metrics.json records)."""
        return asdict(self)

    def replace(self, **changes) -> GenerationOptions:
        return GenerationOptions.from_kwargs(**{**asdict(self), **changes})

    def decoding_key(self) -> tuple:
        """What must be equal for requests to share one beam search: every option but seed and stop."""
        return tuple(
            tuple(v) if isinstance(v, list) else v
            for f in fields(self)
            if f.name not in ("seed", "stop")
            for v in [getattr(self, f.name)]
        )


def bounds(name: str) -> dict:
    """The bounds of option ``name``: {"ge": ..., "gt": ..., "le": ...} without the unset ones."""
    meta = _FIELDS[name].metadata
    return {k: meta[k] for k in ("ge", "gt", "le") if meta[k] is not None}


def check(name: str, value) -> None:
    """Raise a PrefixTuneError naming ``name`` if ``value`` is outside its bounds."""
    b = bounds(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrefixTuneError(f"{name} must be a number, got {value!r}")
    if value != value or ("ge" in b and value < b["ge"]) or ("gt" in b and value <= b["gt"]):
        raise PrefixTuneError(f"{name} must be {_describe(b)}, got {value}")
    if "le" in b and value > b["le"]:
        raise PrefixTuneError(f"{name} must be {_describe(b)}, got {value}")


def _describe(b: dict) -> str:
    low = f"≥ {b['ge']}" if "ge" in b else (f"> {b['gt']}" if "gt" in b else "")
    high = f"≤ {b['le']}" if "le" in b else ""
    return " and ".join(x for x in (low, high) if x)


_FIELDS = {f.name: f for f in fields(GenerationOptions)}
_TYPES = {"int": int, "float": float, "int | None": int}
PRESET_OPTIONS = ("num_beams", "max_new_tokens", "length_penalty")  # what task presets set


# ---------------------------------------------------------------------- CLI
def _flag_type(name: str, kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        try:
            check(name, value)
        except PrefixTuneError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    return parse


def add_flags(group, preset_note: str | None = None, exclude: tuple[str, ...] = ()) -> None:
    """One flag per option (``--num-beams`` ...). Unset flags stay None, leaving the value to the preset's
    settings or the option's default; ``preset_note`` names where preset settings come from."""
    for f in fields(GenerationOptions):
        meta = f.metadata
        if not meta["flag"] or f.name in exclude:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = "unset" if f.default is None else str(f.default)
        if preset_note and f.name in PRESET_OPTIONS:
            default = f"{preset_note}, else {default}"
        if f.type == "bool":
            group.add_argument(flag, action="store_true", default=None, help=meta["help"])
            continue
        if f.name == "stop":
            group.add_argument(flag, action="append", default=None, metavar="TEXT", help=f"{meta['help']} (repeatable)")
            continue
        kind = _TYPES[f.type]
        group.add_argument(
            flag,
            type=_flag_type(f.name, kind),
            default=None,
            metavar="N" if kind is int else "X",
            help=f"{meta['help']} ({_describe(bounds(f.name))}; default: {default})",
        )


def from_flags(args, base: dict | None = None) -> GenerationOptions:
    """The options given by ``base`` (a preset's), overridden by the flags given."""
    values = dict(base or {})
    for f in fields(GenerationOptions):
        given = getattr(args, f.name, None)
        if f.metadata["flag"] and given is not None:
            values[f.name] = given
    return GenerationOptions.from_kwargs(**values)


# ---------------------------------------------------------------------- HTTP
def pydantic_fields(renamed: dict | None = None, defaults: dict | None = None) -> dict:
    """Field definitions for ``pydantic.create_model``: every HTTP option with its default, bounds and help.

    ``renamed`` maps an option to another field name (OpenAI's ``max_tokens``), or to None to leave it
    out; ``defaults`` gives other defaults by option name.
    """
    renamed, defaults = renamed or {}, defaults or {}
    from typing import Annotated

    from pydantic import Field, StrictBool, StrictFloat

    out = {}
    for f in fields(GenerationOptions):
        if not f.metadata["http"] or renamed.get(f.name, f.name) is None:
            continue
        name = renamed.get(f.name, f.name)
        if f.name == "stop":
            text = Annotated[str, Field(max_length=256)]
            out[name] = (
                text | Annotated[list[text], Field(max_length=16)] | None,
                Field(None, description=f.metadata["help"]),
            )
            continue
        default = defaults.get(f.name, f.default if f.default is not MISSING else None)
        if f.type == "bool":
            kind = StrictBool
        elif f.type == "float":
            kind = Annotated[StrictFloat, Field(allow_inf_nan=False, **bounds(f.name))]
        else:
            kind = integer(nullable=f.type == "int | None", **bounds(f.name))
        out[name] = (kind, Field(default, description=f.metadata["help"]))
    return out


def integer(nullable: bool = False, **limits):
    """A pydantic integer type within ``limits`` (ge, le, ...): JSON's integers, 6.0 included (as JSON Schema
    counts it), but not text or booleans. The bounds are on the number itself, so that they hold (and show in
    the schema) when it may be null."""
    from typing import Annotated

    from pydantic import BeforeValidator, Field

    def whole(value):
        if isinstance(value, (str, bool)):
            raise ValueError("Input should be a valid integer")
        return value

    kind = Annotated[int, Field(**limits), BeforeValidator(whole)]
    return kind | None if nullable else kind


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """``text`` up to the first occurrence of any stop string (all of it if none occurs)."""
    cuts = [text.find(s) for s in (stop or []) if s and s in text]
    return text[: min(cuts)] if cuts else text
