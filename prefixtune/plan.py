"""What a training run tells its user: its plan when it starts, and a progress bar while it trains."""

from __future__ import annotations

import math
import sys


def plan_text(
    cfg, train: int, dev: int, dev_available: int, per_epoch: int, total: int, step: int, model_dtype: str | None = None
) -> str:
    """What a run will do, in one paragraph: examples, steps, epochs, dev evaluations, the model's dtype."""
    epochs = total / per_epoch
    lines = [
        f"train: {train:,} examples, {total:,} steps of {cfg.batch_size} "
        f"({epochs:.3g} epoch{'s' if epochs != 1 else ''} of {per_epoch:,} steps)"
    ]
    if dev:
        cut = f" (the first {dev:,} of {dev_available:,}; --dev-size sets how many, 'all' for every one)"
        evaluations = math.ceil(total / per_epoch)
        lines.append(
            f"dev loss: {dev:,} examples{cut if dev < dev_available else ''}, "
            f"after every epoch ({evaluations:,} time{'s' if evaluations != 1 else ''}, "
            f"{math.ceil(dev / cfg.batch_size):,} batches each); the best on dev is kept"
        )
    else:
        lines.append("dev loss: no dev examples; the last prefix is kept")
    if model_dtype:
        lines.append(f"frozen model: {model_dtype}; prefix and optimizer: fp32")
    if step:
        lines.append(f"resuming at step {step:,}")
    return "\n".join(lines)


def print_plan(cfg, *args, **kwargs) -> None:
    print(plan_text(cfg, *args, **kwargs), file=sys.stderr, flush=True)


def progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
