"""How a training step's examples are batched: the epoch's batches, each process's micro-batches
with their loss weights, and gradient accumulation over them (one DDP synchronization per step)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from .features import collate


def batches(num: int, batch_size: int, seed: int, epoch: int, lengths: list[int] | None = None) -> list[list[int]]:
    """The epoch's shuffled batches of example indices, fixed by (seed, epoch).

    With ``lengths``, examples of similar length share a batch (less padding): the shuffled order is
    cut into windows of 50 batches, each window is sorted by length and cut into batches, and the
    batches are shuffled again.
    """
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, num, batch_size)]
    window, out = 50 * batch_size, []
    for i in range(0, num, window):
        chunk = sorted(order[i : i + window], key=lambda j: lengths[j])
        out += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    shuffle = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed * 100_003 + epoch + 50_000))
    return [out[k] for k in shuffle.tolist()]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def passes(batch: list, dist, micro: int, targets: int) -> list[tuple[list, float]]:
    """This process's micro-batches of a global batch, each with its loss weight.

    The weight is world size ÷ the global batch's target tokens: a micro-batch's mean loss times its
    target tokens times the weight makes the gradient, once DDP has averaged it over processes,
    exactly that of the mean loss over the global batch. Every process runs the same number of
    passes (rank 0's share is the largest): a process with fewer examples adds zero-weight passes, so
    that DDP's and FSDP's collectives stay in step.

    Where the share is split, its examples are sorted by length first, so that each micro-batch is
    padded only to its own longest example: the same gradient (a weighted sum over the same examples)
    over fewer padding positions. (On this 2-core CPU that did not measure faster than one batch: the
    smaller products run less efficiently; it takes less memory, 1721 against 2365 MB in bench_train.)
    """
    mine = dist.shard(batch)
    if micro < len(mine):  # micro-batches of similar lengths: each is padded only to its own longest example
        mine = sorted(mine, key=_length)
    chunks = [(mine[j : j + micro], dist.world_size / targets) for j in range(0, len(mine), micro)]
    most = math.ceil(math.ceil(len(batch) / dist.world_size) / micro)
    return chunks + [(batch[:1], 0.0)] * (most - len(chunks))


def _length(features) -> tuple[int, int]:
    """What an example costs in a padded micro-batch: its input length, then its labels' (decoder inputs)."""
    return len(features.input_ids), len(features.labels) if features.decoder else 0


def accumulate(runner, device, passes: list[tuple[list, float]], pad_id: int, scaler, ddp: bool) -> float:
    """Forward and backward each weighted micro-batch; DDP synchronizes once, after the last one.

    Returns the sum of the per-token losses of the real (non-zero-weight) passes.
    """
    loss_sum = 0.0
    for j, (features, weight) in enumerate(passes):
        sync = runner.no_sync() if ddp and j != len(passes) - 1 else nullcontext()
        with sync:
            out = runner(**to_device(collate(features, pad_id), device), loss_only=True)
            scaler.scale(out.loss * (out.num_target_tokens * weight)).backward()
        if weight > 0:
            loss_sum += float(out.loss.detach()) * out.num_target_tokens
    return loss_sum
