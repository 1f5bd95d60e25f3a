"""Run directories: checkpoints (prefix + optimizer state), the JSONL log and the loss plot.

Everything is written to a temporary name and renamed, so a run killed at any moment (even with
``kill -9``) leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import PrefixTuneError
from .files import atomic_write

CHECKPOINT = "checkpoints/checkpoint.pt"
LOG = "log.jsonl"
PLOT = "loss.png"


def save_checkpoint(run_dir: Path, state: dict) -> None:
    """Write the training state atomically to ``checkpoints/checkpoint.pt``."""
    atomic_write(run_dir / CHECKPOINT, lambda p: torch.save(state, p))


def load_checkpoint(run_dir: Path) -> dict | None:
    """The last checkpoint of a run, or None if it has none yet."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise PrefixTuneError(f"{path}: corrupted checkpoint ({type(e).__name__}); delete it to restart") from None


class RunLog:
    """Append-only ``log.jsonl``, one JSON object per event, flushed as written."""

    def __init__(self, run_dir: Path, keep_until_step: int | None = None) -> None:
        self.path = run_dir / LOG
        self.records: list[dict] = []
        if keep_until_step is not None and self.path.is_file():
            # Resuming: keep what happened up to the checkpoint, drop what will be redone.
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by the kill
                if record.get("step", 0) <= keep_until_step:
                    self.records.append(record)
        atomic_write(self.path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in self.records)))
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def plot_losses(
    run_dir: Path,
    records: list[dict],
    ylabel: str = "cross-entropy (nats / target token)",
    title: str = "prefixtune training",
) -> None:
    """Write ``loss.png``: training loss per step and dev loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("event") == "step"]
    dev = [(r["step"], r["dev_loss"]) for r in records if r.get("event") == "dev"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if dev:
        ax.plot(*zip(*dev), "o-", label="dev loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(run_dir / PLOT, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
