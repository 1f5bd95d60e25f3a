"""Training a prefix on a frozen model (Li & Liang 2021, §5.3 setup).

AdamW with a linear schedule and warmup, gradient accumulation and clipping; the loss is taken on
target tokens only. Dev loss is measured every epoch and the best prefix is kept. Checkpoints
(prefix + optimizer + schedule + data position) allow ``resume`` to continue a killed run and end
with exactly the prefix an uninterrupted run would have.

Under torchrun (see :mod:`prefixtune.distributed`) every process takes a strided share of each
global batch; the loss is normalized by the global batch's target tokens, so N processes train the
same prefix as one process with the same ``batch_size``. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

from . import checkpoint as ckpt
from . import distributed
from .base import load_base
from .batching import accumulate as _accumulate
from .batching import batches
from .batching import passes as _passes
from .batching import to_device as _to
from .compiling import compile_layers, uncompile_layers
from .config import PrefixConfig
from .data import Example, load_examples, subset
from .errors import PrefixTuneError
from .features import Formatter, collate, context_length
from .files import base_fingerprint, write_json
from .model import PrefixTunedModel
from .plan import print_plan as _print_plan
from .plan import progress_bar as _progress


@dataclass
class TrainConfig:
    """What to train and how.

    Attributes:
        output: Run directory: final prefix, log.jsonl, loss.png, checkpoints/.
        data: Data file or folder (E2E: trainset.csv/devset.csv; JSONL: train.jsonl/dev.jsonl).
        task: ``jsonl`` or ``e2e``.
        model: Hugging Face id or local folder; None for the default SmolLM2-135M-Instruct.
        dev_data: Dev file; default the dev split next to the training data, if any.
        train_size: Train on a reproducible random subset of this many examples.
        subset_seed: Seed of that subset.
        dev_size: Use at most this many dev examples (the first ones) for the dev loss after every
            epoch; None for the whole dev split. The default, 500, keeps each dev evaluation to a
            few hundred forward passes whatever the dev split's size (E2E's has 4,672 rows).
        epochs: Passes over the training data.
        max_steps: Stop after this many optimizer steps (overrides epochs).
        batch_size: Examples per optimizer step, over all processes (the global batch).
        grad_accum: Split each batch into this many micro-batches (same result, less memory).
        lr: Peak learning rate.
        warmup_steps: Linear warmup steps, then linear decay to 0.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient clipping norm (0 disables).
        seed: Seed of initialization and data order.
        dtype: ``auto``, ``fp32``, ``bf16`` or ``fp16`` for the frozen model (auto: bf16 on GPUs
            that support it and on CPUs that multiply bf16 clearly faster, else fp32). The prefix itself
            is always kept in fp32.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        fsdp: Shard the frozen base across processes with FSDP2 (under torchrun).
        checkpoint_every: Write a checkpoint every this many steps (and at each epoch end).
        truncate: Cut sources longer than the context instead of failing.
        resume: Continue from the run directory's last checkpoint.
        progress: Show a progress bar.
        cache_dir: Where the converted default model is cached (default ~/.cache/prefixtune).
        gradient_checkpointing: Recompute layers in the backward pass to save memory.
        group_by_length: Batch examples of similar length together: less padding, faster steps.
        compile: Compile each layer of the frozen base with ``torch.compile`` (one-off cost first).
        prefix: The prefix to train.
    """

    output: str
    data: str
    task: str = "jsonl"
    model: str | None = None
    dev_data: str | None = None
    train_size: int | None = None
    subset_seed: int = 0
    dev_size: int | None = 500  # a few hundred forward passes per dev evaluation, whatever the split's size
    epochs: int = 5
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "auto"
    device: str = "auto"
    fsdp: bool = False
    checkpoint_every: int = 50
    truncate: bool = False
    resume: bool = False
    progress: bool = False
    cache_dir: str | None = None
    gradient_checkpointing: bool = False
    group_by_length: bool = False
    compile: bool = False
    prefix: PrefixConfig = field(default_factory=PrefixConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise PrefixTuneError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.dev_size is not None and self.dev_size < 1:
            raise PrefixTuneError(f"dev_size must be ≥ 1 (None for the whole dev split), got {self.dev_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise PrefixTuneError(f"max_steps must be ≥ 1, got {self.max_steps}")
        if not self.lr > 0:
            raise PrefixTuneError(f"lr must be > 0, got {self.lr}")
        if self.grad_accum > self.batch_size:
            raise PrefixTuneError(f"grad_accum {self.grad_accum} exceeds batch_size {self.batch_size}")
        if self.dtype not in distributed.DTYPE_NAMES:
            raise PrefixTuneError(f"dtype must be one of {', '.join(distributed.DTYPE_NAMES)}, got {self.dtype!r}")
        if self.compile and (self.fsdp or self.gradient_checkpointing):
            other = "fsdp" if self.fsdp else "gradient_checkpointing"
            raise PrefixTuneError(f"compile cannot be combined with {other} yet; drop one of the two")
        if self.device.split(":")[0] not in distributed.DEVICES:
            raise PrefixTuneError(f"device must be one of {', '.join(distributed.DEVICES)}, got {self.device!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["prefix"] = self.prefix.to_dict()
        return d


@dataclass
class TrainResult:
    """What a run produced: its directory, steps, and losses."""

    output: Path
    steps: int
    final_loss: float
    best_dev_loss: float | None
    best_step: int | None  # the step of the best dev loss (the prefix saved as "best"); None without dev data
    model: PrefixTunedModel


def _load_splits(cfg: TrainConfig) -> tuple[list[Example], list[Example], int]:
    """The training subset, the dev examples used for dev loss, and the dev split's full size."""
    train = subset(load_examples(cfg.task, cfg.data, "train"), cfg.train_size, cfg.subset_seed)
    if cfg.dev_data:
        dev = load_examples(cfg.task, cfg.dev_data, "dev")
    elif Path(cfg.data).is_dir():
        try:
            dev = load_examples(cfg.task, cfg.data, "dev")
        except PrefixTuneError as e:
            if "not found" not in str(e):
                raise
            dev = []  # the folder has no dev split
    else:
        dev = []
    return train, dev[: cfg.dev_size] if cfg.dev_size else dev, len(dev)


@torch.no_grad()
def dev_loss(
    model: PrefixTunedModel, features, batch_size: int, pad_id: int, dist=None, progress: bool = False
) -> float:
    """Mean cross-entropy per target token over ``features`` (each process takes a share under torchrun)."""
    dist = dist or distributed.Dist()
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(features), batch_size)
    if progress and dist.is_main:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="dev loss", unit="batch", leave=False, dynamic_ncols=True)
    for i in starts:
        mine = dist.shard(features[i : i + batch_size])
        # Every process runs every pass (FSDP's all-gathers are collective); a share-less one discards its pass.
        out = model(**_to(collate(mine or features[i : i + 1], pad_id), model.device), loss_only=True)
        if mine:
            total += float(out.loss) * out.num_target_tokens
            count += out.num_target_tokens
    total, count = dist.sum([total, count], model.device)
    model.train()
    return total / max(count, 1)


def _prepare_run_dir(cfg: TrainConfig, dist) -> tuple[Path, dict | None]:
    run_dir = Path(cfg.output)
    state = ckpt.load_checkpoint(run_dir) if cfg.resume else None
    if not cfg.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise PrefixTuneError(f"{run_dir}: output folder is not empty; pass --resume to continue it or pick another")
    dist.barrier()  # every process has checked before the first one writes
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, state


class _NoLog:
    """What processes other than rank 0 log: nothing."""

    records: list = []

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def train(config: TrainConfig | None = None, base=None, **kwargs) -> TrainResult:
    """Train a prefix and write the run directory.

    The run goes through four named phases (methods of :class:`_Run`): ``setup`` (data, model,
    optimizer, the run directory, a resumed state), ``step`` (one optimizer step), ``evaluate``
    (dev loss after an epoch; the best prefix is saved) and ``checkpoint`` (everything a resume
    needs); ``finish`` writes what is left.

    Args:
        config: A :class:`TrainConfig`; or pass its fields as keyword arguments.
        base: Optional ``(model, tokenizer)`` already loaded, instead of ``config.model``.

    Returns:
        A :class:`TrainResult`.
    """
    run = _Run.setup(config or TrainConfig(**kwargs), base)
    while run.step_count < run.total_steps:
        epoch, offset = divmod(run.step_count, run.steps_per_epoch)
        for indices in batches(len(run.train_features), run.cfg.batch_size, run.cfg.seed, epoch, run.lengths)[offset:]:
            run.step(indices, epoch)
            if run.step_count % run.steps_per_epoch == 0 or run.step_count == run.total_steps:
                run.evaluate(epoch)
                run.checkpoint()
            elif run.step_count % run.cfg.checkpoint_every == 0:
                run.checkpoint()
            if run.step_count >= run.total_steps:
                break
    return run.finish()


class _Run:
    """The state of one training run, and its phases."""

    @classmethod
    def setup(cls, cfg: TrainConfig, base=None) -> _Run:
        """Data, model, optimizer and run directory; the saved state when resuming; the plan printed."""
        run = cls()
        run.cfg = cfg
        run.dist, device = distributed.init(cfg.device)
        if cfg.fsdp and not run.dist.enabled:
            raise PrefixTuneError("fsdp needs several processes: launch with torchrun or --nproc N")
        run.dtype = distributed.resolve_dtype(cfg.dtype, device)
        train_examples, dev_examples, dev_available = _load_splits(cfg)
        model_obj, tokenizer = base or load_base(
            cfg.model, dtype=run.dtype, device=device, cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None
        )
        torch.manual_seed(cfg.seed)
        model = PrefixTunedModel.wrap(model_obj, cfg.prefix, tokenizer)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.compile:
            compile_layers(model)
        if cfg.fsdp:
            base_fingerprint(model)  # computed once now: rank 0 alone could not read the sharded weights later
            distributed.shard_base(model)
        run.model = model
        run.runner = distributed.wrap_ddp(model, model.device) if run.dist.enabled else model
        if cfg.model:
            model.base_name = cfg.model
        run.prefix = model.get_prefix()
        fmt = Formatter(
            tokenizer,
            model.geometry.is_encoder_decoder,
            context_length(model_obj.config),
            run.prefix.num_tokens,
            cfg.truncate,
        )
        run.train_features = [fmt.encode(e) for e in train_examples]
        run.dev_features = [fmt.encode(e) for e in dev_examples]
        run.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fmt.eos
        run.run_dir, state = _prepare_run_dir(cfg, run.dist)  # only once the inputs are known to be good

        run.steps_per_epoch = math.ceil(len(run.train_features) / cfg.batch_size)
        run.lengths = (
            [len(f.input_ids) + (len(f.labels) if f.decoder else 0) for f in run.train_features]
            if cfg.group_by_length
            else None
        )
        run.total_steps = cfg.max_steps or cfg.epochs * run.steps_per_epoch
        run.params = model.trainable_parameters()
        run.optimizer = torch.optim.AdamW(run.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        run.scheduler = get_linear_schedule_with_warmup(run.optimizer, cfg.warmup_steps, run.total_steps)
        # fp16 needs loss scaling
        run.scaler = torch.amp.GradScaler(model.device.type, enabled=model.dtype == torch.float16)
        run.step_count, run.best, run.best_step = 0, None, None
        if state is not None:
            run.prefix.load_state_dict(state["prefix"])
            run.optimizer.load_state_dict(state["optimizer"])
            run.scheduler.load_state_dict(state["scheduler"])
            if "scaler" in state:
                run.scaler.load_state_dict(state["scaler"])
            torch.set_rng_state(state["rng"])
            run.step_count, run.best, run.best_step = state["step"], state["best_dev_loss"], state["best_step"]
        if run.dist.is_main:
            write_json(run.run_dir / "train_config.json", {**cfg.to_dict(), "world_size": run.dist.world_size})
            run.log = ckpt.RunLog(run.run_dir, keep_until_step=run.step_count if state is not None else None)
        else:
            run.log = _NoLog()
        run.log.write(
            {
                "event": "start",
                "step": run.step_count,
                "train_examples": len(run.train_features),
                "dev_examples": len(run.dev_features),
                "total_steps": run.total_steps,
                "trainable_parameters": sum(p.numel() for p in run.params),
                "world_size": run.dist.world_size,
                "base_parameters_here": distributed.local_numel(model.base),  # ~1/N of the base under FSDP
                "resumed": state is not None,
            }
        )
        shown = cfg.progress and run.dist.is_main
        if shown:
            counts = (len(run.train_features), len(run.dev_features), dev_available)
            note = distributed.dtype_note(cfg.dtype, model.device) if base is None else None  # a given base: its own
            _print_plan(cfg, *counts, run.steps_per_epoch, run.total_steps, run.step_count, model_dtype=note)
        run.bar = _progress(shown, run.total_steps, run.step_count)
        model.train()
        run.loss_value, run.started, run.seen = float("nan"), time.perf_counter(), 0
        run.micro = math.ceil(math.ceil(cfg.batch_size / run.dist.world_size) / cfg.grad_accum)  # per process
        return run

    def step(self, indices: list[int], epoch: int) -> float:
        """One optimizer step on the examples ``indices`` (the global batch); returns its loss."""
        batch = [self.train_features[i] for i in indices]
        targets = sum(sum(t != -100 for t in f.labels) for f in batch)  # of the global batch
        self.optimizer.zero_grad(set_to_none=True)
        passes = _passes(batch, self.dist, self.micro, targets)
        loss_sum = _accumulate(self.runner, self.model.device, passes, self.pad_id, self.scaler, self.dist.enabled)
        loss_sum = self.dist.sum([loss_sum], self.model.device)[0]
        if self.cfg.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step_count += 1
        self.loss_value = loss_sum / targets
        tokens = sum(len(f.input_ids) + (len(f.labels) if f.decoder else 0) for f in batch)
        self.seen += tokens
        rate = self.seen / (time.perf_counter() - self.started)
        self.log.write(
            {
                "event": "step",
                "step": self.step_count,
                "epoch": epoch,
                "loss": self.loss_value,
                "lr": self.scheduler.get_last_lr()[0],
                "target_tokens": targets,
                "tokens": tokens,
                "tokens_per_s": rate,
            }
        )
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.loss_value:.3f}", tok_s=f"{rate:.0f}")
        return self.loss_value

    def evaluate(self, epoch: int) -> float | None:
        """Dev loss (None without dev examples); a new best is saved as the run's prefix."""
        if not self.dev_features:
            return None
        loss_dev = dev_loss(
            self.model, self.dev_features, self.cfg.batch_size, self.pad_id, self.dist, self.cfg.progress
        )
        self.log.write({"event": "dev", "step": self.step_count, "epoch": epoch, "dev_loss": loss_dev})
        if self.best is None or loss_dev < self.best:
            self.best, self.best_step = loss_dev, self.step_count
            if self.dist.is_main:
                self.model.save_prefix(self.run_dir, metadata=self.metadata())
        return loss_dev

    def checkpoint(self) -> None:
        """Everything a resume needs: prefix, optimizer, schedule, loss scaler, RNG, step, best so far."""
        if not self.dist.is_main:
            return
        ckpt.save_checkpoint(
            self.run_dir,
            {
                "prefix": self.prefix.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": torch.get_rng_state(),
                "step": self.step_count,
                "best_dev_loss": self.best,
                "best_step": self.best_step,
            },
        )

    def metadata(self) -> dict:
        cfg = self.cfg
        return {
            "task": cfg.task,
            "data": str(cfg.data),
            "train_examples": len(self.train_features),
            "steps": self.step_count,
            "lr": cfg.lr,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed,
            "dtype": self.dtype,
            "best_dev_loss": self.best,
            "best_step": self.best_step,
            "init_text": cfg.prefix.init_text,
        }

    def finish(self) -> TrainResult:
        """The last prefix when there was no dev data, the log's end, the loss plot; the result."""
        if self.bar is not None:
            self.bar.close()
        if not self.dev_features and self.dist.is_main:
            self.model.save_prefix(self.run_dir, metadata=self.metadata())
        self.log.write(
            {
                "event": "end",
                "step": self.step_count,
                "loss": self.loss_value,
                "best_dev_loss": self.best,
                "best_step": self.best_step,
            }
        )
        self.log.close()
        if self.dist.is_main:
            ckpt.plot_losses(self.run_dir, self.log.records)
        self.dist.barrier()  # the run directory is complete for every process
        if self.cfg.compile:
            uncompile_layers(self.model)
        return TrainResult(self.run_dir, self.step_count, self.loss_value, self.best, self.best_step, self.model)


def read_log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / ckpt.LOG).read_text().splitlines() if line.strip()]
