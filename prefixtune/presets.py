"""The paper's hyperparameters per task (Li & Liang 2021, §5.3 and Appendix A).

A preset fills in training and decoding settings; any flag given explicitly wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PrefixTuneError

TABLE_TO_TEXT_DECODING = {"num_beams": 5, "max_new_tokens": 100}
SUMMARIZATION_DECODING = {"num_beams": 6, "max_new_tokens": 62, "length_penalty": 0.8}


@dataclass(frozen=True)
class Preset:
    """Settings of one paper configuration.

    Attributes:
        name: Preset name.
        task: The task it is for (None: any table-to-text task).
        train: Training settings (TrainConfig / CLI names).
        prefix: Prefix settings (PrefixConfig names).
        decoding: Generation settings used by ``generate`` and ``train --eval``.
        max_steps_by_size: For low-data runs, max steps by training-set size.
    """

    name: str
    task: str | None
    train: dict = field(default_factory=dict)
    prefix: dict = field(default_factory=dict)
    decoding: dict = field(default_factory=dict)
    max_steps_by_size: tuple[tuple[int, int], ...] = ()

    def max_steps_for(self, train_size: int | None) -> int | None:
        """Low-data max steps: 200 for ≤ 200 examples, 400 up to 500 (the paper's 50/100/200/500)."""
        if not self.max_steps_by_size or train_size is None:
            return None
        for size, steps in self.max_steps_by_size:
            if train_size <= size:
                return steps
        return self.max_steps_by_size[-1][1]


PRESETS = {
    "e2e": Preset(
        "e2e", "e2e", {"lr": 8e-5, "epochs": 5, "batch_size": 10}, {"num_virtual_tokens": 5}, TABLE_TO_TEXT_DECODING
    ),
    "webnlg": Preset(
        "webnlg",
        "webnlg",
        {"lr": 5e-5, "epochs": 5, "batch_size": 5},
        {"num_virtual_tokens": 5},
        TABLE_TO_TEXT_DECODING,
    ),
    "dart": Preset(
        "dart", "dart", {"lr": 5e-5, "epochs": 10, "batch_size": 5}, {"num_virtual_tokens": 10}, TABLE_TO_TEXT_DECODING
    ),
    "xsum": Preset(
        "xsum",
        "xsum",
        {"lr": 5e-5, "epochs": 30, "batch_size": 14},
        {"num_virtual_tokens": 100, "mid_dim": 800},
        SUMMARIZATION_DECODING,
    ),
    "lowdata": Preset(
        "lowdata",
        None,
        {"lr": 5e-5, "batch_size": 10},
        {"init_text": "table-to-text:"},
        TABLE_TO_TEXT_DECODING,
        ((50, 200), (100, 200), (200, 200), (500, 400)),
    ),
}


def get_preset(name: str | None) -> Preset | None:
    if name is None:
        return None
    if name not in PRESETS:
        raise PrefixTuneError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def decoding_for(task: str | None, preset: str | None = None) -> dict:
    """Decoding settings: the preset's, else the paper's for the task (table-to-text or summarization)."""
    chosen = get_preset(preset)
    if chosen is not None:
        return dict(chosen.decoding)
    return dict(SUMMARIZATION_DECODING if task == "xsum" else TABLE_TO_TEXT_DECODING)
