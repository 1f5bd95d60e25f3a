"""Compress a long prompt into a short learned prefix (``prefixtune distill``).

Teacher: the frozen model with the prompt's tokens in front of each input. The prompt's keys and
values are computed once and held as a prefix of the prompt's own length N, which is exactly the
prompt in front (tested against the plain forward pass). Student: the same model with a prefix of P
tokens, initialized from the prompt's own keys and values (``first``: its first P tokens;
``pool``: the mean of P contiguous chunks; ``random``). Objective: KL(teacher ‖ student) of the
next-token distributions along the teacher's own greedy continuations of the inputs, generated once
and cached in the output folder (``teacher.jsonl``).

Inputs are formatted exactly as ``prefixtune generate`` and the server's ``/v1/completions`` format
them (``source <sep>``), so the output folder is an ordinary prefix: ``generate``, ``serve`` and
``export-peft`` take it. A killed run resumes from its last checkpoint (``resume=True``) and ends
with the prefix an uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

from . import checkpoint as ckpt
from . import distributed
from .base import load_base
from .batching import batches
from .config import PrefixConfig
from .errors import PrefixTuneError
from .features import Features, Formatter, collate, context_length, left_pad
from .files import atomic_write, write_json
from .formats import read_text
from .model import PrefixTunedModel
from .options import GenerationOptions
from .prefix import Prefix
from .state import PrefixedState

INITS = ("first", "pool", "random")
TEACHER, STUDENT = "teacher", "default"
TEACHER_FILE = "teacher.jsonl"


@dataclass
class DistillConfig:
    """What to distill and how.

    Attributes:
        output: Folder to create: the distilled prefix, teacher.jsonl, log.jsonl, loss.png, checkpoints/.
        prompt: The prompt text the prefix stands for (tokenized without special tokens).
        inputs: Input texts (the ``source`` of each example), or a JSONL file of ``{"source": ...}`` lines.
        num_virtual_tokens: P, the prefix length; at most the prompt's token count.
        init: ``first`` (the prompt's keys and values at its first P tokens: the best in
            ``benchmarks/results/distill.md``), ``pool`` (their mean over P contiguous chunks) or ``random``.
        model: Hugging Face id or local folder; None for the default SmolLM2-135M-Instruct.
        max_new_tokens: Length of the teacher's greedy continuations.
        steps: Optimizer steps.
        batch_size: Inputs per step.
        lr: Peak learning rate (AdamW, linear warmup and decay).
        warmup_steps: Linear warmup steps.
        max_grad_norm: Gradient clipping norm (0 disables).
        reparameterize: Train through the paper's MLP (ejected at the end) instead of the flat tensors.
        mid_dim: Hidden width of that MLP.
        seed: Seed of the data order and of a random initialization.
        dtype, device: As in :class:`prefixtune.training.TrainConfig`.
        checkpoint_every: Write a checkpoint every this many steps.
        teacher_batch_size: Inputs per batch when generating the teacher's continuations.
        resume: Continue the run in ``output`` from its last checkpoint.
        progress: Show progress bars.
        cache_dir: Where the converted default model is cached.
    """

    output: str
    prompt: str
    inputs: list[str] | str
    num_virtual_tokens: int = 16
    init: str = "first"
    model: str | None = None
    max_new_tokens: int = 64
    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    reparameterize: bool = False
    mid_dim: int = 512
    seed: int = 42
    dtype: str = "auto"
    device: str = "auto"
    checkpoint_every: int = 25
    teacher_batch_size: int = 16
    resume: bool = False
    progress: bool = False
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise PrefixTuneError("the prompt is empty: give the text the prefix should stand for")
        for name in ("num_virtual_tokens", "max_new_tokens", "steps", "batch_size", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PrefixTuneError(f"{name} must be a positive integer, got {value!r}")
        if self.teacher_batch_size < 1:
            raise PrefixTuneError(f"teacher_batch_size must be ≥ 1, got {self.teacher_batch_size}")
        if self.init not in INITS:
            raise PrefixTuneError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not self.lr > 0:
            raise PrefixTuneError(f"lr must be > 0, got {self.lr}")
        if self.dtype not in distributed.DTYPE_NAMES:
            raise PrefixTuneError(f"dtype must be one of {', '.join(distributed.DTYPE_NAMES)}, got {self.dtype!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not isinstance(self.inputs, str):
            d["inputs"] = f"{len(self.inputs)} texts"
        return d


@dataclass
class DistillResult:
    """What a distillation produced."""

    output: Path
    steps: int
    final_kl: float
    prompt_tokens: int
    model: PrefixTunedModel


def read_inputs(path) -> list[str]:
    """The ``source`` of each line of a JSONL file (other fields, e.g. ``target``, are ignored)."""
    path = Path(path)
    sources = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrefixTuneError(f"{path}:{number}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("source"), str) or not obj["source"].strip():
            raise PrefixTuneError(f"{path}:{number}: needs a non-empty string field 'source'")
        sources.append(obj["source"])
    if not sources:
        raise PrefixTuneError(f"{path}: no inputs")
    return sources


def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids: the text as it stands in front of an input, without special tokens."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def add_prompt_prefix(model: PrefixTunedModel, name: str, ids: list[int]) -> Prefix:
    """Hold the prompt ``ids`` as prefix ``name``: its keys and values, frozen. Inputs after it see
    exactly what they would see with the prompt's tokens in front of them."""
    if model.geometry.is_encoder_decoder:
        raise PrefixTuneError(
            "distill supports decoder-only models: an encoder reads the prompt and the input together, "
            "so no prefix can stand for a prompt exactly"
        )
    prefix = Prefix(PrefixConfig(num_virtual_tokens=len(ids), reparameterize=False), model.geometry).to(model.device)
    prefix.parts["decoder"].fit(prompt_values(model, ids).float())
    prefix.requires_grad_(False)
    return model.put_prefix(name, prefix)


def prompt_values(model: PrefixTunedModel, ids: list[int]) -> torch.Tensor:
    """The frozen model's keys and values of the prompt ``ids``: (N, L, 2, H, D)."""
    return model._activations(torch.tensor([ids], device=model.device), "kv")["decoder"]


def initial_prefix(values: torch.Tensor, tokens: int, how: str) -> torch.Tensor | None:
    """The student's start from the prompt's keys and values (N, ...) → (P, ...); None for ``random``."""
    if how == "random":
        return None
    if tokens > len(values):
        raise PrefixTuneError(
            f"num_virtual_tokens={tokens} exceeds the prompt's {len(values)} tokens: a prefix that long saves nothing"
        )
    if how == "first":
        return values[:tokens].clone()
    return torch.stack([chunk.mean(dim=0) for chunk in torch.tensor_split(values, tokens, dim=0)])  # pool


def target_logits(model: PrefixTunedModel, batch: dict, prefix: str) -> torch.Tensor:
    """Logits (N, V) in fp32 at the N positions whose next token carries a label, with ``prefix`` on every row."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    predict = torch.zeros_like(labels, dtype=torch.bool)  # (B, T): positions whose next token is a target
    predict[:, :-1] = labels[:, 1:] != -100
    state = PrefixedState.causal(model, model.batch_prefix(prefix, len(ids))["decoder"], keep=False)
    if model._target_logits:
        logits = model.run_causal(ids, mask, state, logits_to_keep=predict).logits
        return logits.reshape(int(predict.sum()), -1).float()
    return model.run_causal(ids, mask, state).logits[predict].float()


def kl_per_token(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) of each row's next-token distribution, from logits (N, V) → (N,)."""
    t, s = teacher.log_softmax(-1), student.log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1)


class Distillation:
    """A frozen model holding the prompt as prefix ``teacher`` and the student as prefix ``default``,
    with the inputs tokenized and the teacher's continuations: what training and evaluation share."""

    def __init__(self, model: PrefixTunedModel, tokenizer, prompt: str, max_new_tokens: int) -> None:
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        self.prompt_ids = prompt_tokens(tokenizer, prompt)
        if not self.prompt_ids:
            raise PrefixTuneError("the prompt has no tokens")
        add_prompt_prefix(model, TEACHER, self.prompt_ids)
        self.format = Formatter(tokenizer, False, context_length(model.base.config), len(self.prompt_ids))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.format.eos

    def source_ids(self, sources: list[str]) -> list[list[int]]:
        """Each input as ``generate`` and the server format it (``source <sep>``), checked to fit after the prompt."""
        room = self.max_new_tokens
        return [self.format.source_ids(s, f"input {i + 1}", target_room=room) for i, s in enumerate(sources)]

    def teacher_key(self, sources: list[list[int]]) -> str:
        """What the teacher's continuations of ``sources`` depend on: model, dtype, prompt, inputs, length."""
        text = json.dumps([self.model.base_name, str(self.model.dtype), self.prompt_ids, sources, self.max_new_tokens])
        return hashlib.sha256(text.encode()).hexdigest()

    @torch.no_grad()
    def continuations(
        self, sources: list[list[int]], batch_size: int, progress: bool = False, prefix: str = TEACHER
    ) -> list[list[int]]:
        """The greedy continuation of each input under ``prefix`` (default: the teacher), ending with EOS when
        it ends before the limit."""
        options = GenerationOptions(
            max_new_tokens=self.max_new_tokens, eos_token_id=self.format.eos, pad_token_id=self.pad_id
        )
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        out: list[list[int]] = [[] for _ in sources]
        bar = _bar(progress, len(sources), "teacher", "input")
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            ids, mask = left_pad([sources[i] for i in chunk], self.pad_id)
            rows = self.model.generate(ids.to(self.model.device), mask.to(self.model.device), prefix, options=options)
            for row, i in enumerate(chunk):
                new = rows[row, ids.shape[1] :].tolist()
                out[i] = new[: new.index(self.format.eos) + 1] if self.format.eos in new else new
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out

    def features(self, sources: list[list[int]], continuations: list[list[int]]) -> list[Features]:
        """Input then continuation; the continuation's tokens are the targets."""
        return [Features(s + c, [-100] * len(s) + c) for s, c in zip(sources, continuations) if c]

    def batch(self, features: list[Features]) -> dict:
        return {k: v.to(self.model.device) for k, v in collate(features, self.pad_id).items()}

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> torch.Tensor:
        return target_logits(self.model, batch, TEACHER)

    @torch.no_grad()
    def evaluate(self, features: list[Features], batch_size: int = 8, student: str = STUDENT) -> dict:
        """Mean KL per continuation token and the greedy-token agreement (the student's most likely next
        token equals the teacher's) along the teacher's continuations."""
        was_training = self.model.training
        self.model.eval()
        kl_sum, agree, count = 0.0, 0, 0
        for i in range(0, len(features), batch_size):
            batch = self.batch(features[i : i + batch_size])
            teacher, pupil = self.teacher_logits(batch), target_logits(self.model, batch, student)
            kl_sum += float(kl_per_token(teacher, pupil).sum())
            agree += int((teacher.argmax(-1) == pupil.argmax(-1)).sum())
            count += len(teacher)
        self.model.train(was_training)
        return {"kl": kl_sum / max(count, 1), "agreement": agree / max(count, 1), "tokens": count}


def _bar(enabled: bool, total: int, desc: str, unit: str, initial: int = 0):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)


def load_teacher(path: Path, key: str) -> list[list[int]] | None:
    """Teacher continuations saved by :func:`save_teacher` under the same ``key``; None if absent,
    made for other inputs (another key) or cut by a kill."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        if json.loads(lines[0]).get("key") != key:
            return None
        return [json.loads(line)["ids"] for line in lines[1:]]
    except (json.JSONDecodeError, KeyError, IndexError, AttributeError):
        return None


def save_teacher(path: Path, key: str, continuations: list[list[int]], tokenizer) -> None:
    """One header line (the key, the count), then each continuation's ids and text; written atomically."""
    rows = [json.dumps({"key": key, "inputs": len(continuations)})]
    rows += [json.dumps({"ids": c, "text": tokenizer.decode(c, skip_special_tokens=True)}) for c in continuations]
    atomic_write(path, lambda p: p.write_text("\n".join(rows) + "\n", encoding="utf-8"))


def distill(config: DistillConfig | None = None, base=None, **kwargs) -> DistillResult:
    """Distill a prompt into a prefix and write the output folder.

    Args:
        config: A :class:`DistillConfig`; or pass its fields as keyword arguments.
        base: Optional ``(model, tokenizer)`` already loaded, instead of ``config.model``.

    Returns:
        A :class:`DistillResult`; the prefix is saved in ``config.output`` as an ordinary prefix folder.
    """
    cfg = config or DistillConfig(**kwargs)
    sources_text = read_inputs(cfg.inputs) if isinstance(cfg.inputs, (str, Path)) else list(cfg.inputs)
    if not sources_text or not all(isinstance(s, str) and s.strip() for s in sources_text):
        raise PrefixTuneError("inputs must be a non-empty list of non-empty texts")
    device = distributed.resolve_device(cfg.device)
    dtype = distributed.resolve_dtype(cfg.dtype, device)
    model_obj, tokenizer = base or load_base(
        cfg.model, dtype=dtype, device=device, cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None
    )
    model = PrefixTunedModel(model_obj, tokenizer)
    if cfg.model:
        model.base_name = cfg.model
    job = Distillation(model, tokenizer, cfg.prompt, cfg.max_new_tokens)
    sources = job.source_ids(sources_text)
    values = prompt_values(model, job.prompt_ids)
    start = initial_prefix(values, cfg.num_virtual_tokens, cfg.init)  # checks P against the prompt first
    torch.manual_seed(cfg.seed)
    student = Prefix(
        PrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens, reparameterize=cfg.reparameterize, mid_dim=cfg.mid_dim),
        model.geometry,
    ).to(model.device)
    if start is not None:
        student.parts["decoder"].fit(start.float())
    model.put_prefix(STUDENT, student)
    model.active = STUDENT

    run_dir = Path(cfg.output)
    state = ckpt.load_checkpoint(run_dir) if cfg.resume else None
    if not cfg.resume and run_dir.exists() and any(run_dir.iterdir()):
        raise PrefixTuneError(f"{run_dir}: output folder is not empty; pass --resume to continue it or pick another")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "distill_config.json", cfg.to_dict())
    if cfg.progress:
        note = distributed.dtype_note(cfg.dtype, model.device) if base is None else str(model.dtype)
        print(
            f"distill: a prompt of {len(job.prompt_ids)} tokens into a prefix of {cfg.num_virtual_tokens} "
            f"(init {cfg.init}); {len(sources)} inputs, teacher continuations of up to {cfg.max_new_tokens} tokens; "
            f"{cfg.steps} steps of {cfg.batch_size}; model {model.base_name}, {note}",
            flush=True,
        )

    key = job.teacher_key(sources)
    continuations = load_teacher(run_dir / TEACHER_FILE, key)
    if continuations is None:
        continuations = job.continuations(sources, cfg.teacher_batch_size, cfg.progress)
        save_teacher(run_dir / TEACHER_FILE, key, continuations, tokenizer)
    features = job.features(sources, continuations)
    if not features:
        raise PrefixTuneError("the teacher ended every input at once (EOS first): nothing to distill")

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    step = 0
    if state is not None:
        student.load_state_dict(state["prefix"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
    log = ckpt.RunLog(run_dir, keep_until_step=step if state is not None else None)
    log.write({"event": "start", "step": step, "inputs": len(features), "prompt_tokens": len(job.prompt_ids)})
    per_epoch = math.ceil(len(features) / cfg.batch_size)
    bar = _bar(cfg.progress, cfg.steps, "distill", "step", step)
    model.train()
    kl, started = float("nan"), time.perf_counter()
    while step < cfg.steps:
        epoch, offset = divmod(step, per_epoch)
        for indices in batches(len(features), cfg.batch_size, cfg.seed, epoch)[offset:]:
            batch = job.batch([features[i] for i in indices])
            teacher = job.teacher_logits(batch)
            optimizer.zero_grad(set_to_none=True)
            loss = kl_per_token(teacher, target_logits(model, batch, STUDENT)).mean()
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step, kl = step + 1, float(loss.detach())
            log.write({"event": "step", "step": step, "epoch": epoch, "loss": kl, "lr": scheduler.get_last_lr()[0]})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{kl:.4f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                ckpt.save_checkpoint(
                    run_dir,
                    {
                        "prefix": student.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "step": step,
                    },
                )
            if step >= cfg.steps:
                break
    if bar is not None:
        bar.close()
    metadata = {
        "distilled": {
            "prompt_tokens": len(job.prompt_ids),
            "init": cfg.init,
            "inputs": len(features),
            "steps": step,
            "final_kl": kl,
            "lr": cfg.lr,
            "max_new_tokens": cfg.max_new_tokens,
            "seconds": round(time.perf_counter() - started, 1),
        }
    }
    model.remove_prefix(TEACHER)
    model.save_prefix(run_dir, STUDENT, metadata=metadata)
    log.write({"event": "end", "step": step, "loss": kl})
    log.close()
    ckpt.plot_losses(run_dir, log.records, "KL(teacher ‖ student) per token", "prefixtune distill")
    return DistillResult(run_dir, step, kl, len(job.prompt_ids), model)
