"""Training throughput, side by side: prefixtune vs PEFT prefix tuning (HF Trainer) vs full fine-tuning.

Same model (default SmolLM2-135M-Instruct), same data (an E2E train subset with its real lengths,
source masked), same batch size, same prefix (P virtual tokens through a 512-wide MLP), same number
of steps. Each system runs in its own process so that its peak RSS is its own. Also measures this
machine's matmul GFLOP/s (fp32, bf16) and the FLOP-bound tokens/s (peak ÷ 4 × parameters per token
for a frozen base). Prints one JSON line last and writes benchmarks/results/train.md.

    python benchmarks/bench_train.py [--steps 20] [--batch-size 8] [--systems prefixtune,peft,full]

``--device cuda`` trains on a GPU (batches, timings and peak GPU memory there; the matmul rates of that GPU; model
FLOP utilization, 4 × parameters FLOPs per token, against the maker's bf16 peak where the GPU is known:
benchmarks/machine.py). benchmarks/gpu_check.sh runs it on a lent GPU.

Needs the `peft` package for system b (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import matmul_rate, peak_memory_mb, spec_peak, sync

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "e2e"


def _features(args):
    """Token ids and labels (source masked) of the first steps × batch E2E training examples."""
    from prefixtune import load_base
    from prefixtune.data import load_examples, subset
    from prefixtune.features import Formatter, context_length

    model, tokenizer = load_base(args.model, dtype=args.dtype, device=args.device)
    examples = subset(load_examples("e2e", args.data, "train"), (args.steps + args.warmup) * args.batch_size, 0)
    fmt = Formatter(tokenizer, False, context_length(model.config), args.prefix_len)
    return model, tokenizer, [fmt.encode(e) for e in examples]


def _on(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _batches(features, batch_size, pad_id, device="cpu"):
    from prefixtune.features import collate

    return [_on(collate(features[i : i + batch_size], pad_id), device) for i in range(0, len(features), batch_size)]


def run_prefixtune(args, group_by_length: bool = False, compile_layers: bool = False, micro: bool = False) -> dict:
    from prefixtune import PrefixConfig, PrefixTunedModel
    from prefixtune.features import collate
    from prefixtune.training import batches

    base, tokenizer, features = _features(args)
    torch.manual_seed(0)
    model = PrefixTunedModel.wrap(base, PrefixConfig(num_virtual_tokens=args.prefix_len, mid_dim=512))
    model.train()
    if compile_layers:  # ``--compile``: the warmup steps pay the compilation
        from prefixtune.compiling import compile_layers as compile_them

        compile_them(model)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=args.lr)
    timed = _batches(features, args.batch_size, tokenizer.pad_token_id, args.device)
    if group_by_length:  # the same examples, batched by similar length (``--group-by-length``): less padding
        groups = batches(len(features), args.batch_size, 0, 0, [len(f.input_ids) for f in features])
        timed = [_on(collate([features[i] for i in g], tokenizer.pad_token_id), args.device) for g in groups]
    if micro:  # the same batches, each step in two length-sorted micro-batches (``--grad-accum 2``)
        groups = [features[i : i + args.batch_size] for i in range(0, len(features), args.batch_size)]
        return _timed(args, timed, _micro_steps(args, model, tokenizer.pad_token_id), opt, groups)

    def backward(batch) -> float:
        loss = model(**batch, loss_only=True).loss
        loss.backward()
        return float(loss)

    return _timed(args, timed, backward, opt)


def _micro_steps(args, model, pad_id):
    """Forward and backward of a batch's features as the library's training step does with ``--grad-accum 2``."""
    from prefixtune.batching import accumulate, passes
    from prefixtune.distributed import Dist

    scaler = torch.amp.GradScaler(enabled=False)

    def backward(group) -> float:
        targets = sum(sum(t != -100 for t in f.labels) for f in group)
        micro = passes(group, Dist(), -(-len(group) // 2), targets)
        return accumulate(model, args.device, micro, pad_id, scaler, False) / targets

    return backward


def run_prefixtune_micro(args) -> dict:
    """prefixtune on the same batches as ``prefixtune``, each optimizer step in two micro-batches of similar
    lengths (what ``prefixtune train --grad-accum 2`` does): the same gradient, less padding."""
    return run_prefixtune(args, micro=True)


def run_prefixtune_grouped(args) -> dict:
    return run_prefixtune(args, group_by_length=True)


def run_prefixtune_compiled(args) -> dict:
    return run_prefixtune(args, group_by_length=True, compile_layers=True)


def run_peft(args, group_by_length: bool = False) -> dict:
    from peft import PrefixTuningConfig, get_peft_model

    base, tokenizer, features = _features(args)
    torch.manual_seed(0)
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=args.prefix_len, prefix_projection=True, encoder_hidden_size=512
    )
    model = get_peft_model(base, config)
    return _trainer(args, model, tokenizer, features, group_by_length)


def run_peft_grouped(args) -> dict:
    """PEFT with the Trainer's own ``group_by_length``: the fair peer of ``prefixtune_grouped``."""
    return run_peft(args, group_by_length=True)


def run_full(args) -> dict:
    base, tokenizer, features = _features(args)
    return _trainer(args, base, tokenizer, features)


def _trainer(args, model, tokenizer, features, group_by_length: bool = False) -> dict:
    """The usual Hugging Face Trainer recipe; step times from a callback, and the batches it trained on
    (the order of the examples is the Trainer's own: shuffled, or grouped by length)."""
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    from prefixtune.features import collate

    marks: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            sync(args.device)
            marks.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    rows = [{"input_ids": f.input_ids, "labels": f.labels} for f in features]

    seen = []

    def collator(batch):
        from prefixtune.features import Features

        seen.append(collate([Features(r["input_ids"], r["labels"]) for r in batch], tokenizer.pad_token_id))
        return seen[-1]

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            max_steps=args.steps + args.warmup,
            learning_rate=args.lr,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            remove_unused_columns=False,
            disable_tqdm=True,
            use_cpu=torch.device(args.device).type == "cpu",
            # The same batches as prefixtune's (in order), or the Trainer's own length grouping.
            train_sampling_strategy="group_by_length" if group_by_length else "sequential",
        )
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collator, callbacks=[Clock()])
        sync(args.device)
        start = time.perf_counter()
        trainer.train()
    marks.insert(0, start)
    return _summary(args, marks, seen[: args.steps + args.warmup], losses[-1] if losses else float("nan"))


def _timed(args, batches, backward, opt, steps=None) -> dict:
    """One optimizer step per item of ``steps`` (default: ``batches``), ``backward(item)`` giving its loss;
    tokens are counted on ``batches``, the same examples collated."""
    marks, loss = [time.perf_counter()], float("nan")
    for item in batches if steps is None else steps:
        opt.zero_grad(set_to_none=True)
        loss = backward(item)
        opt.step()
        sync(args.device)
        marks.append(time.perf_counter())
    return _summary(args, marks, batches, loss)


def _summary(args, marks, batches, final_loss) -> dict:
    timed = batches[args.warmup :]
    seconds = marks[-1] - marks[args.warmup]
    real = sum(int(b["attention_mask"].sum()) for b in timed)
    target = sum(int((b["labels"] != -100).sum()) for b in timed)
    gpu_mb = peak_memory_mb(args.device)
    return {
        "tokens_per_s": real / seconds,
        "target_tokens_per_s": target / seconds,
        "seconds_per_step": seconds / len(timed),
        "warmup_seconds": marks[args.warmup] - marks[0],  # includes compilation for the compiled system
        "final_loss": final_loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **({"peak_gpu_mb": gpu_mb} if gpu_mb is not None else {}),
    }


SYSTEMS = {
    "prefixtune": run_prefixtune,
    "prefixtune_micro": run_prefixtune_micro,
    "prefixtune_grouped": run_prefixtune_grouped,
    "prefixtune_compiled": run_prefixtune_compiled,
    "peft": run_peft,
    "peft_grouped": run_peft_grouped,
    "full": run_full,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(DATA), help="E2E release folder")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default: 20)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed first steps (default: 2)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="the frozen model's dtype (default: fp32)"
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    ap.add_argument(
        "--systems", default="prefixtune,prefixtune_micro,prefixtune_grouped,prefixtune_compiled,peft,peft_grouped,full"
    )
    ap.add_argument("--system", default=None, help=argparse.SUPPRESS)  # child process: run one system
    ap.add_argument("--output", default=str(HERE / "results" / "train.md"))
    args = ap.parse_args()
    if args.system:
        print(json.dumps(SYSTEMS[args.system](args)))
        return
    results = {}
    for name in args.systems.split(","):
        cmd = [sys.executable, __file__, "--system", name, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    fp32, bf16 = (_matmul_gflops(dtype, args.device) for dtype in (torch.float32, torch.bfloat16))
    from transformers import AutoConfig

    from prefixtune.base import convert_default_model

    params = _parameter_count(args.model or str(convert_default_model()), AutoConfig)
    limit = (bf16 if args.dtype == "bf16" else fp32) * 1e9 / (4 * params)  # the bound of the dtype trained in
    ours = results.get("prefixtune", {})
    peft = results.get("peft", {})
    summary = {
        "benchmark": "train",
        "dtype": args.dtype,
        "device": args.device,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "prefix_len": args.prefix_len,
        "matmul_gflops_fp32": round(fp32, 1),
        "matmul_gflops_bf16": round(bf16, 1),
        "parameters": params,
        "flop_limit_tokens_per_s": round(limit, 1),
        **{f"{name}_{k}": round(v, 4) for name, r in results.items() for k, v in r.items()},
    }
    if ours and peft:
        summary["speedup_vs_peft"] = round(ours["tokens_per_s"] / peft["tokens_per_s"], 3)
        for variant in ("micro", "grouped", "compiled"):
            if f"prefixtune_{variant}" in results:
                tokens = results[f"prefixtune_{variant}"]["tokens_per_s"]
                summary[f"speedup_vs_peft_{variant}"] = round(tokens / peft["tokens_per_s"], 3)
        summary["peak_rss_ratio_vs_peft"] = round(ours["peak_rss_mb"] / peft["peak_rss_mb"], 3)
    if "prefixtune_grouped" in results and "peft_grouped" in results:  # both given length grouping
        grouped = results["prefixtune_grouped"]["tokens_per_s"] / results["peft_grouped"]["tokens_per_s"]
        summary["speedup_vs_peft_grouped_both"] = round(grouped, 3)
    if ours and peft and "peak_gpu_mb" in ours:
        summary["peak_gpu_ratio_vs_peft"] = round(ours["peak_gpu_mb"] / peft["peak_gpu_mb"], 3)
    if (peak := spec_peak(args.device)) is not None:  # model FLOP utilization against the maker's bf16 peak
        summary["gpu"] = torch.cuda.get_device_name(args.device)
        summary["spec_peak_tflop_s"] = round(peak / 1e12, 1)
        summary |= {f"{name}_mfu": round(r["tokens_per_s"] * 4 * params / peak, 4) for name, r in results.items()}
    if ours:
        summary["fraction_of_flop_limit"] = round(ours["tokens_per_s"] / limit, 3)
    if "prefixtune_grouped" in results:
        summary["fraction_of_flop_limit_grouped"] = round(results["prefixtune_grouped"]["tokens_per_s"] / limit, 3)
    _write_table(args, results, summary)
    print(json.dumps(summary))


def _matmul_gflops(dtype: torch.dtype, device) -> float:
    """The matmul rate of :mod:`machine`: n = 1024 on the CPU (as this benchmark's records), 8192 on a GPU."""
    return matmul_rate(dtype, device, n=1024 if torch.device(device).type == "cpu" else None) / 1e9


def _parameter_count(path: str, auto_config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(auto_config.from_pretrained(path))
    return sum(p.numel() for p in model.parameters())


def _write_table(args, results, summary) -> None:
    gpu = "peak_gpu_mb" in next(iter(results.values()), {})
    extra = " peak GPU (MB) | MFU |" if gpu else ""
    rows = [
        "| system | tokens/s (all) | tokens/s (target) | s/step | warmup s | peak RSS (MB) | final loss |" + extra,
        "|---|---|---|---|---|---|---|" + ("---|---|" if gpu else ""),
    ]
    for name, r in results.items():
        cells = f" {r['peak_gpu_mb']:.0f} | {summary.get(f'{name}_mfu', '–')} |" if gpu else ""
        rows.append(
            f"| {name} | {r['tokens_per_s']:.1f} | {r['target_tokens_per_s']:.1f} | "
            f"{r['seconds_per_step']:.2f} | {r['warmup_seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['final_loss']:.3f} |" + cells
        )
    where = (
        f", {summary['gpu']} (MFU: 4 × parameters FLOPs per token ÷ {summary['spec_peak_tflop_s']} TFLOP/s)"
        if gpu and "gpu" in summary
        else ""
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# bench_train\n\n{args.steps} steps × batch {args.batch_size}, frozen model in {args.dtype} on {args.device}"
        f"{where}, E2E train "
        f"subset, prefix {args.prefix_len} tokens (MLP 512).\n\n" + "\n".join(rows) + "\n\n"
        f"matmul: fp32 {summary['matmul_gflops_fp32']} GFLOP/s, bf16 {summary['matmul_gflops_bf16']} "
        f"GFLOP/s; FLOP-bound ({args.dtype}, 4 × {summary['parameters']} FLOPs/token): "
        f"{summary['flop_limit_tokens_per_s']} tokens/s\n"
    )


if __name__ == "__main__":
    main()
