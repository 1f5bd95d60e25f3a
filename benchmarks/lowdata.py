"""The paper's low-data experiment (Li & Liang 2021, §6.3), side by side on one model.

For each E2E training size (default 50 and 100; also 200, 500) and subset seed (default 0, 1, 2),
the systems train on the same examples with the same budget (the lowdata preset: batch 10, 200
steps for ≤ 200 examples and 400 for 500; dev loss after every epoch selects the checkpoint):
- prefixtune prefix-tuning (init "table-to-text:", MLP reparameterization, lr 5e-5);
- LoRA (PEFT ``LoraConfig``: r=8, alpha 16, no dropout, on q/k/v/o; lr 2e-4, the LoRA paper's
  E2E learning rate; merged into the model to decode) — what most users would pick instead;
- full fine-tuning of the same model (lr 5e-5);
- ``peft``: PEFT's own prefix-tuning (``PrefixTuningConfig``, MLP projection, lr 5e-5; decoded by
  prefixtune after ``import_peft``, which gives PEFT's own logits: PEFT 0.21's ``generate`` drops
  the prefix, see bench_generate.py); not in the default set.
Each selected model decodes the first ``--test-limit`` unique E2E test MRs with beam 5 and is
scored with the official E2E metrics. Runs are cached one JSON per run under the output folder, so
the script can be stopped and restarted; finished runs are skipped, and a run killed half-way
continues from its last epoch (its checkpoints live in ``<output>/.work/`` until it finishes).
Writes results.md (table), bleu_vs_size.png and prints one JSON line last.

    python benchmarks/lowdata.py [--sizes 50,100] [--subsets 0,1,2] [--systems prefixtune,lora,full]
    python benchmarks/lowdata.py --report [--rescore]   # tables and plot from the saved runs

The report lists every saved run, then, per size, the mean ± standard deviation over the subsets
that every listed system finished, and the first system minus each other one, paired by subset.

Needs `pip install -e ".[bench]"` and Java (METEOR). On a 2-core CPU one run takes 30-90 minutes
(training with a dev evaluation per epoch, then 630 beam-5 decodes); an H200 (``--device cuda``)
takes 40-80 s.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when loaded from a file (tests)
from lowdata_report import report  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "e2e"
INIT = "table-to-text:"


def _data(args, size, subset_seed):
    from prefixtune.data import load_examples, subset

    train = subset(load_examples("e2e", args.data, "train"), size, subset_seed)
    dev = load_examples("e2e", args.data, "dev")[: args.dev_size]
    return train, dev


MAX_STEPS: int | None = None  # --max-steps: a smoke-test override of the preset's budget


def _steps(size: int) -> int:
    from prefixtune.presets import PRESETS

    return MAX_STEPS or PRESETS["lowdata"].max_steps_for(size)


def run_prefixtune(args, size, subset_seed, out: Path):
    from prefixtune import PrefixConfig
    from prefixtune.training import TrainConfig, train

    result = train(
        TrainConfig(
            output=str(out / "run"),
            data=args.data,
            task="e2e",
            model=args.model,
            train_size=size,
            subset_seed=subset_seed,
            dev_size=args.dev_size,
            max_steps=_steps(size),
            batch_size=10,
            lr=5e-5,
            seed=args.seed,
            device=args.device,
            dtype=args.dtype,
            prefix=PrefixConfig(init_text=INIT, mid_dim=512),
            progress=True,
            resume=True,  # continues a killed run from its last checkpoint; starts one if there is none
        )
    )
    model = result.model
    model.load_prefix(out / "run", name="best")
    return model, model.tokenizer, "best", result.best_dev_loss, result.best_step


def _loop(args, model, params, size, subset_seed, tokenizer, virtual_tokens: int, out: Path, lr: float = 5e-5):
    """The same loop for PEFT, LoRA and full fine-tuning: AdamW, batch 10, dev loss per epoch, best state kept.

    Each epoch ends with a checkpoint in ``out/checkpoints/`` (trained weights, optimizer, schedule,
    best state); a later call on the same folder continues from it, with the same result as an unbroken run
    (the batches of an epoch depend only on the seed and the epoch, and the model has no dropout).
    """
    from prefixtune.checkpoint import load_checkpoint, save_checkpoint
    from prefixtune.features import Formatter, collate, context_length
    from prefixtune.training import batches

    train, dev = _data(args, size, subset_seed)
    fmt = Formatter(tokenizer, False, context_length(model.config), virtual_tokens)
    pad = tokenizer.pad_token_id
    train_f, dev_f = [fmt.encode(e) for e in train], [fmt.encode(e) for e in dev]
    steps, per_epoch = _steps(size), math.ceil(len(train_f) / 10)
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    best, best_state, best_step, step = None, None, None, 0
    state = load_checkpoint(out)
    if state is not None:
        model.load_state_dict(state["trained"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        best, best_state, step = state["best"], state["best_state"], state["step"]
        best_step = state.get("best_step")  # absent from checkpoints written before it was recorded
    epoch = step // per_epoch  # checkpoints are at epoch ends (or after the last step)
    device = next(model.parameters()).device
    bar = tqdm(total=steps, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def loss_of(features):
        b = {k: v.to(device) for k, v in collate(features, pad).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        labels = b["labels"][:, 1:]
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1))

    while step < steps:
        for group in batches(len(train_f), 10, args.seed, epoch):
            model.train()
            opt.zero_grad(set_to_none=True)
            loss_of([train_f[i] for i in group]).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % per_epoch == 0 or step == steps:
                model.eval()
                with torch.no_grad():
                    total = sum(
                        float(loss_of(dev_f[i : i + 10])) * len(dev_f[i : i + 10]) for i in range(0, len(dev_f), 10)
                    )
                dev_loss = total / len(dev_f)
                if best is None or dev_loss < best:
                    best, best_step = dev_loss, step
                    best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                bar.set_postfix(dev_loss=f"{dev_loss:.3f}", best=f"{best:.3f}")
                save_checkpoint(
                    out,
                    {
                        "trained": {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "best": best,
                        "best_state": best_state,
                        "best_step": best_step,
                        "step": step,
                    },
                )
            if step >= steps:
                break
        epoch += 1
    bar.close()
    model.load_state_dict(best_state, strict=False)
    return best, best_step


def _base(args):
    from prefixtune import load_base
    from prefixtune.distributed import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    return load_base(args.model, dtype=resolve_dtype(args.dtype, device), device=device)


def run_peft(args, size, subset_seed, out: Path):
    from peft import PrefixTuningConfig, get_peft_model

    from prefixtune import PrefixTunedModel
    from prefixtune.interop import import_peft

    base, tok = _base(args)
    torch.manual_seed(args.seed)
    p = len(tok(INIT, add_special_tokens=False)["input_ids"])
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=p, prefix_projection=True, encoder_hidden_size=512
    )
    peft_model = get_peft_model(base, config)
    params = [q for q in peft_model.parameters() if q.requires_grad]
    best, best_step = _loop(args, peft_model, params, size, subset_seed, tok, p, out)
    peft_model.save_pretrained(out / "peft")
    model = PrefixTunedModel(peft_model.get_base_model(), tok)
    import_peft(model, out / "peft", name="best")
    return model, tok, "best", best, best_step


LORA_LR = 2e-4  # the LoRA paper's learning rate for E2E (Hu et al. 2021, GPT-2 on E2E); 5e-5 barely moves B from 0


def run_lora(args, size, subset_seed, out: Path):
    """LoRA (PEFT): r=8, alpha 16, no dropout, on every attention projection; merged into the base to decode."""
    from peft import LoraConfig, get_peft_model

    base, tok = _base(args)
    torch.manual_seed(args.seed)
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    targets = [t for t in ("q_proj", "k_proj", "v_proj", "o_proj") if t in names] or None  # None: PEFT's default
    config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets)
    peft_model = get_peft_model(base, config)
    params = [q for q in peft_model.parameters() if q.requires_grad]
    best, best_step = _loop(args, peft_model, params, size, subset_seed, tok, 0, out, lr=LORA_LR)
    merged = peft_model.merge_and_unload()
    for q in merged.parameters():
        q.requires_grad_(False)
    return merged.eval(), tok, None, best, best_step


def run_full(args, size, subset_seed, out: Path):
    base, tok = _base(args)
    torch.manual_seed(args.seed)
    params = list(base.parameters())
    for q in params:
        q.requires_grad_(True)
    best, best_step = _loop(args, base, params, size, subset_seed, tok, 0, out)
    for q in params:
        q.requires_grad_(False)
    return base.eval(), tok, None, best, best_step


def _hf_decode(base, tok, sources: list[str], batch_size: int) -> list[str]:
    """Beam-5 decoding of a fine-tuned model (no prefix) with Hugging Face generate."""
    from prefixtune.features import Formatter, context_length, left_pad

    fmt = Formatter(tok, False, context_length(base.config), 0)
    prompts = [fmt.source_ids(s) for s in sources]
    out = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    bar = tqdm(total=len(prompts), desc="generate", unit="input", dynamic_ncols=True)
    for k in range(0, len(order), batch_size):
        chunk = order[k : k + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], tok.pad_token_id)
        with torch.no_grad():
            gen = base.generate(
                input_ids=ids.to(base.device),
                attention_mask=mask.to(base.device),
                num_beams=5,
                max_new_tokens=100,
                do_sample=False,
                eos_token_id=fmt.eos,
                pad_token_id=tok.pad_token_id,
            )
        for row, i in enumerate(chunk):
            out[i] = tok.decode(gen[row, ids.shape[1] :].tolist(), skip_special_tokens=True).strip()
        bar.update(len(chunk))
    bar.close()
    return out


SYSTEMS = {"prefixtune": run_prefixtune, "peft": run_peft, "lora": run_lora, "full": run_full}


def _test_groups(args):
    from prefixtune.data import group_references, load_examples

    return group_references(load_examples("e2e", args.data, "test"))[: args.test_limit]


def _score(args, predictions: list[str]) -> dict:
    from prefixtune.metrics import evaluate

    return evaluate("e2e", [refs for _, refs in _test_groups(args)], predictions)


def one_run(args, system, size, subset_seed, out: Path) -> tuple[dict, list[str]]:
    """Train, select, decode (and score): the run's record and its predictions, one per test MR."""
    from prefixtune.decode import decode_texts

    resumed = out.is_dir() and any(out.iterdir())
    start = time.perf_counter()
    model, tok, name, dev_loss, best_step = SYSTEMS[system](args, size, subset_seed, out)
    trained = time.perf_counter() - start
    sources = [s for s, _ in _test_groups(args)]
    if name is None:  # full fine-tuning: no prefix
        predictions = _hf_decode(model, tok, sources, args.decode_batch)
    else:
        options = {"num_beams": 5, "max_new_tokens": 100}
        predictions = decode_texts(
            model, tok, sources, prefix=name, batch_size=args.decode_batch, options=options, progress=True
        )
    scores = _score(args, predictions) if args.score else {}
    record = {
        "system": system,
        "size": size,
        "subset": subset_seed,
        "best_dev_loss": dev_loss,
        "best_step": best_step,  # the step the selected weights come from
        "train_seconds": trained,  # of this process only, when resumed
        "resumed": resumed,
        "decode_seconds": time.perf_counter() - start - trained,
        "test_mrs": len(sources),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        **scores,
    }
    return record, predictions


def main() -> None:
    from prefixtune.files import write_json, write_lines

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--sizes", default="50,100", help="training sizes (default: 50,100; the paper adds 200,500)")
    ap.add_argument("--subsets", default="0,1,2", help="subset seeds (default: 0,1,2)")
    ap.add_argument(
        "--systems",
        default="prefixtune,lora,full",
        help="of prefixtune, lora, full, peft; the first is compared with each other (default: prefixtune,lora,full)",
    )
    ap.add_argument("--dev-size", type=int, default=200, help="dev examples for selection (default: 200)")
    ap.add_argument("--test-limit", type=int, default=630, help="unique test MRs decoded (default: all 630)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32", help="the frozen model's dtype (default: fp32, as on the CPU runs)")
    ap.add_argument("--decode-batch", type=int, default=10, help="test inputs decoded together (default: 10)")
    ap.add_argument(
        "--no-score",
        dest="score",
        action="store_false",
        help="only decode (e.g. on a GPU machine without Java); a later run scores the saved predictions",
    )
    ap.add_argument("--max-steps", type=int, default=None, help="override the preset's steps (smoke tests only)")
    ap.add_argument("--output", default=str(HERE / "results" / "lowdata"))
    ap.add_argument("--report", action="store_true", help="train nothing: score saved runs, write the table and plot")
    ap.add_argument(
        "--rescore", action="store_true", help="score every saved run's predictions again (a metric changed)"
    )
    args = ap.parse_args()
    global MAX_STEPS
    MAX_STEPS = args.max_steps
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    for size in map(int, args.sizes.split(",")):
        for subset_seed in map(int, args.subsets.split(",")):
            for system in args.systems.split(","):
                file = root / f"{system}-{size}-{subset_seed}.json"
                if not file.is_file() and not args.report:
                    work = root / ".work" / file.stem  # checkpoints, kept until the run's JSON is written
                    record, predictions = one_run(args, system, size, subset_seed, work)
                    write_lines(root / f"{system}-{size}-{subset_seed}.txt", predictions)
                    write_json(file, record)
                    shutil.rmtree(work, ignore_errors=True)
                    if not any(work.parent.iterdir()):
                        work.parent.rmdir()
                    print(json.dumps(record), flush=True)
    # every saved run, listed or not, goes into the report; unscored ones (decoded elsewhere with --no-score,
    # or every one with --rescore after a metric changed) are scored from their saved predictions first
    results = []
    for file in sorted(root.glob("*-*-*.json")):
        record = json.loads(file.read_text())
        if args.score and ("bleu" not in record or args.rescore):
            predictions = file.with_suffix(".txt").read_text(encoding="utf-8").splitlines()
            print(f"scoring {file.with_suffix('.txt').name}", file=sys.stderr, flush=True)
            record.update(_score(args, predictions))
            write_json(file, record)
        if "bleu" in record:
            results.append(record)
    if not results:
        return
    summary = report(root, results, args.systems.split(","))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
