"""Decoding speed against this machine's limits, side by side with what users would pick instead (issue 17).

One run, default model, fp32 (``--dtype bf16``: the model in bf16, floors from bf16 weights and matmul),
this CPU. The same prefix everywhere: the keys and values of an init text
(``--init-text``), which is exactly what CTranslate2 computes for that text as its ``static_prompt``, so
the three systems do the same work and greedy outputs must agree:
- prefixtune ``generate``;
- Hugging Face ``generate`` with the prefix handed over as a pre-filled cache;
- CTranslate2 (a maintained fast CPU inference engine), the default model converted once (fp32), the
  init text as ``static_prompt``, tried with 1 and 2 threads and ``--ct2-compute-types``; its best is
  compared.

Measured, for the decoding steps (the time of ``--new-tokens`` tokens minus that of one, so prompt
processing is in neither the rate nor the floor): batch-1 greedy ms/token (``--batch1-inputs`` E2E test
inputs one at a time) against the memory-bandwidth floor (bytes of weights read per token ÷
copy bandwidth measured in this run); 64-row greedy tokens/s against the FLOP floor (matmul rate
measured in this run ÷ 2 × parameters FLOPs per token); beam-5 decoding of ``--beam-inputs`` E2E test
inputs in batches of 10. Each greedy measurement is the best of ``--repeats`` rounds in which the systems
take turns, and the floors come from the best bandwidth and matmul rate measured at the start and after
each greedy measurement (this machine is shared; a slow moment must decide neither a comparison nor a
floor). Prints one JSON line last and writes benchmarks/results/decode.md.

    python benchmarks/bench_decode.py [--new-tokens 32] [--batch1-inputs 4] [--beam-inputs 50] [--repeats 2]

``--device cuda`` measures on a GPU (its copy bandwidth and bf16/fp32 matmul rate, and the 64-row run's model FLOP
utilization against the maker's peak where the GPU is known: benchmarks/machine.py); ``--systems`` picks the
systems compared (by default all on the CPU, the Torch ones on a GPU). benchmarks/gpu_check.sh runs it on a lent
GPU. Needs ``ctranslate2`` (in the bench extra) where CTranslate2 is compared.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import copy_bandwidth, matmul_rate, spec_peak, sync

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "e2e"


def weight_bytes(base) -> int:
    """Bytes of the weights one decoding step reads: every parameter once (a tied embedding is read whole
    as the output layer; the input embedding reads one row)."""
    return sum(p.numel() * p.element_size() for p in base.parameters())


# ---------------------------------------------------------------------- systems
def _until(tokens: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i]
    return tokens


class Systems:
    """prefixtune, Hugging Face generate with the prefix as cache, and CTranslate2, on the same prompts."""

    def __init__(self, args) -> None:
        from prefixtune import PrefixConfig, PrefixTunedModel, load_base
        from prefixtune.base import convert_default_model
        from prefixtune.data import load_examples
        from prefixtune.features import Formatter, context_length

        torch.set_num_threads(args.threads)
        self.decode_weights, self.device, self.systems = args.decode_weights, torch.device(args.device), args.systems
        base, tok = load_base(args.model, dtype=args.dtype, device=self.device)
        self.tok, self.base = tok, base.eval()
        config = PrefixConfig(init_text=args.init_text, reparameterize=False)
        self.model = PrefixTunedModel.wrap(base, config, tok, name="p").eval()
        self.static = tok.convert_ids_to_tokens(tok(args.init_text, add_special_tokens=False)["input_ids"])
        sources = list(dict.fromkeys(e.source for e in load_examples("e2e", args.data, "test")))
        fmt = Formatter(tok, False, context_length(base.config), len(self.static))
        self.prompts = [fmt.source_ids(s) for s in sources]
        self.eos, self.pad = fmt.eos, tok.pad_token_id if tok.pad_token_id is not None else fmt.eos
        if "ctranslate2" in self.systems:
            self.ct2_path = _ct2_model(args, convert_default_model() if args.model is None else Path(args.model))

    def batch(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and mask on the model's device."""
        from prefixtune.features import left_pad

        return tuple(t.to(self.device) for t in left_pad(prompts, self.pad))

    def ours(self, ids, mask, decode_weights: str | None = None, **opts) -> torch.Tensor:
        """prefixtune ``generate``; ``decode_weights="off"``: every pass through transformers' forward."""
        self.model.decode_weights = decode_weights or self.decode_weights
        return self.model.generate(ids, mask, prefix="p", eos_token_id=self.eos, pad_token_id=self.pad, **opts)

    def ours_forward(self, ids, mask, **opts) -> torch.Tensor:
        """prefixtune without the lean pass (prefixtune.lean): what the lean pass gains."""
        return self.ours(ids, mask, "off", **opts)

    def hf(self, ids, mask, num_beams=1, **opts) -> torch.Tensor:
        from transformers import DynamicCache

        flat = self.model.get_prefix("p").flat_state()["decoder"].to(self.device)  # (P, L, 2, kv_heads, D)
        rows = len(ids) * num_beams  # generate expands the inputs, not a given cache
        cache = DynamicCache(config=self.base.config)
        for layer in range(flat.shape[1]):
            keys, values = (flat[:, layer, i].transpose(0, 1)[None].expand(rows, -1, -1, -1) for i in (0, 1))
            cache.update(keys.contiguous().to(self.base.dtype), values.contiguous().to(self.base.dtype), layer)
        full_mask = torch.cat([mask.new_ones(len(ids), flat.shape[0]), mask], dim=1)
        with torch.no_grad():
            return self.base.generate(
                input_ids=ids,
                attention_mask=full_mask,
                past_key_values=cache,
                num_beams=num_beams,
                do_sample=False,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                **opts,
            )

    def ct2(self, generator, prompts: list[list[int]], new_tokens: int, forced: bool, beam: int = 1):
        tokens = [self.tok.convert_ids_to_tokens(p) for p in prompts]
        results = generator.generate_batch(
            tokens,
            max_length=new_tokens,
            min_length=new_tokens if forced else 0,
            beam_size=beam,
            sampling_topk=1,
            static_prompt=self.static,
            include_prompt_in_result=False,
            end_token=self.tok.convert_ids_to_tokens(self.eos),
        )
        return [_until(r.sequences_ids[0], {self.eos}) for r in results]


def _ct2_model(args, source: Path) -> Path:
    """The model converted for CTranslate2 once (fp32 weights), cached next to the converted default model; converted
    again when the folder's weights are not the ones converted (another model written to the same path)."""
    import ctranslate2

    target = Path(args.ct2_cache) / f"{source.name}-ct2-float32"
    weights = sorted(source.glob("*.safetensors")) or sorted(source.glob("*.bin"))
    stamp = json.dumps([str(source.resolve())] + [[w.name, w.stat().st_size, w.stat().st_mtime_ns] for w in weights])
    made = target / "prefixtune-source.json"
    if not (target / "model.bin").is_file() or not made.is_file() or made.read_text() != stamp:
        print(f"converting {source} for CTranslate2 → {target}", flush=True)
        ctranslate2.converters.TransformersConverter(str(source)).convert(
            str(target), quantization="float32", force=True
        )
        made.write_text(stamp)
    return target


# ---------------------------------------------------------------------- runs
TORCH_SYSTEMS = ("prefixtune", "prefixtune_forward", "hf_generate")
SYSTEMS = (*TORCH_SYSTEMS, "ctranslate2")


def _new(out: torch.Tensor, ids: torch.Tensor, stop: set[int]) -> list[list[int]]:
    return [_until(row.tolist(), stop) for row in out[:, ids.shape[1] :]]  # tolist: the device's work is done


def run_torch(s: Systems, batches, **opts) -> dict:
    """The Torch systems asked for (``--systems``) over the same batches: outputs and seconds."""
    out = {}
    fns = {"prefixtune": s.ours, "prefixtune_forward": s.ours_forward, "hf_generate": s.hf}
    for name in (n for n in TORCH_SYSTEMS if n in s.systems):
        fn = fns[name]
        fn(*batches[0], **{**opts, "max_new_tokens": 2, "min_new_tokens": 0})  # warm-up
        sync(s.device)
        tokens, start = [], time.perf_counter()
        for ids, mask in batches:
            tokens += _new(fn(ids, mask, **opts), ids, {s.eos, s.pad})
        out[name] = (tokens, time.perf_counter() - start)
    return out


def run_ct2(s: Systems, args, prompts_batches, new_tokens, forced, beam=1) -> dict:
    """CTranslate2 at each thread count and compute type: outputs and seconds of each; the fastest is its result.
    Nothing where ``--systems`` leaves it out."""
    if "ctranslate2" not in s.systems:
        return {}
    import ctranslate2

    tried = {}
    for compute in args.ct2_compute_types.split(","):
        for threads in sorted({1, args.threads}):
            gen = ctranslate2.Generator(
                str(s.ct2_path), device=s.device.type, compute_type=compute, intra_threads=threads
            )
            s.ct2(gen, prompts_batches[0], 2, False, beam)  # warm-up (and the static prompt's cache)
            tokens, start = [], time.perf_counter()
            for batch in prompts_batches:
                tokens += s.ct2(gen, batch, new_tokens, forced, beam)
            tried[f"{compute}/{threads}t"] = (tokens, time.perf_counter() - start)
            del gen
    return tried


def best_decode_steps(s: Systems, args, batches, prompt_batches, n: int):
    """:func:`decode_steps` ``--repeats`` times, the systems taking turns within each round; each system's
    fastest round counts (this machine is shared: one slow moment must not decide a comparison)."""
    step: dict = {}
    for _ in range(args.repeats):
        torch_runs, ct2_runs, this = decode_steps(s, args, batches, prompt_batches, n)
        step = {k: min(v, step.get(k, v)) for k, v in this.items()}
    return torch_runs, ct2_runs, step


def decode_steps(s: Systems, args, batches, prompt_batches, n: int):
    """Each system's runs of exactly ``n`` new tokens, and its seconds per decoding step (all batches
    together): the time of ``n`` tokens minus the time of 1 (prompt and first token), over n - 1 steps, so
    that prompt processing counts in neither the rate nor the floor."""
    torch_runs = run_torch(s, batches, max_new_tokens=n, min_new_tokens=n)
    torch_first = run_torch(s, batches, max_new_tokens=1, min_new_tokens=1)
    ct2_runs = run_ct2(s, args, prompt_batches, n, True)
    ct2_first = run_ct2(s, args, prompt_batches, 1, True)
    step = {k: (v[1] - torch_first[k][1]) / (n - 1) for k, v in torch_runs.items()}
    step |= {k: (v[1] - ct2_first[k][1]) / (n - 1) for k, v in ct2_runs.items()}
    return torch_runs, ct2_runs, step


def _systems(text: str, device: str) -> tuple[str, ...]:
    """``--systems``: a comma list of :data:`SYSTEMS` (prefixtune always runs: the others are compared with
    it); ``auto``: all of them on the CPU, the Torch ones on a GPU (CTranslate2's CUDA build is not assumed)."""
    if text == "auto":
        return SYSTEMS if torch.device(device).type == "cpu" else TORCH_SYSTEMS
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise SystemExit(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    return ("prefixtune", *(n for n in names if n != "prefixtune"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(DATA), help="E2E release folder")
    ap.add_argument("--init-text", default="table-to-text: describe the restaurant", help="the prefix's text")
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens per input, greedy runs (default: 32)")
    ap.add_argument("--batch1-inputs", type=int, default=4, help="inputs decoded one at a time (default: 4)")
    ap.add_argument("--rows", type=int, default=64, help="rows of the batched greedy run (default: 64)")
    ap.add_argument("--beam-inputs", type=int, default=50, help="E2E test inputs decoded with beam 5 (default: 50)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="dtype of the model (default: fp32)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    ap.add_argument(
        "--systems",
        default="auto",
        help=f"comma list of {', '.join(SYSTEMS)} (default auto: all on the CPU, the Torch ones on a GPU)",
    )
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads (default: all)")
    ap.add_argument("--ct2-compute-types", default="float32", help="CTranslate2 compute types to try (comma list)")
    ap.add_argument("--ct2-cache", default=str(Path.home() / ".cache" / "prefixtune"), help="converted model cache")
    ap.add_argument(
        "--decode-weights",
        default="auto",
        choices=["auto", "packed", "plain", "off"],
        help="weights of prefixtune's lean pass over prompts and steps (prefixtune.lean; default: auto)",
    )
    ap.add_argument("--repeats", type=int, default=2, help="rounds of each greedy measurement, best kept (default: 2)")
    ap.add_argument("--output", default=str(HERE / "results" / "decode.md"))
    args = ap.parse_args(argv)
    args.systems = _systems(args.systems, args.device)
    return args


def _limits(s: Systems) -> tuple[float, float]:
    return copy_bandwidth(s.device), matmul_rate(s.base.dtype, s.device)


def _rates(summary: dict, measure: str, values: dict, ct2_runs: dict, best_ct2: str | None, digits: int) -> None:
    """``measure`` (``batch1_ms_per_token``, ...) for prefixtune, ``{system}_{measure}`` for each other system
    measured, CTranslate2 at its best setting (and all it tried)."""
    for name in TORCH_SYSTEMS:
        if name in values:
            summary[measure if name == "prefixtune" else f"{name}_{measure}"] = round(values[name], digits)
    if best_ct2 is not None:
        batch = measure.split("_", 1)[0]
        summary[f"ctranslate2_{measure}"] = round(values[best_ct2], digits)
        summary[f"ctranslate2_{batch}_setting"] = best_ct2
        summary[f"ctranslate2_{batch}_all"] = {k: round(values[k], digits) for k in ct2_runs}


def main(argv=None) -> dict:
    args = parse_args(argv)
    s = Systems(args)
    limits = [_limits(s)]
    n = args.new_tokens
    summary = {"benchmark": "decode", "model": s.model.base_name, "dtype": args.dtype, "threads": args.threads}
    summary |= {"device": str(s.device), "systems": list(args.systems), "new_tokens": n, "repeats": args.repeats}
    if s.device.type == "cuda":
        summary["gpu"] = torch.cuda.get_device_name(s.device)

    with torch.inference_mode():
        # batch 1
        ones = [s.batch([p]) for p in s.prompts[: args.batch1_inputs]]
        torch_runs, ct2_runs, step = best_decode_steps(s, args, ones, [[p] for p in s.prompts[: args.batch1_inputs]], n)
        b1 = {k: v * 1000 / args.batch1_inputs for k, v in step.items()}  # ms per token of one row
        best_ct2 = min(ct2_runs, key=lambda k: b1[k]) if ct2_runs else None
        _rates(summary, "batch1_ms_per_token", b1, ct2_runs, best_ct2, 2)
        summary["batch1_greedy_equal"] = _agree(torch_runs, ct2_runs[best_ct2][0] if best_ct2 else None)
        print(json.dumps({k: v for k, v in summary.items() if "batch1" in k}), flush=True)
        limits.append(_limits(s))

        # batch of 64 rows
        rows = (s.prompts * (args.rows // len(s.prompts) + 1))[: args.rows]
        torch_runs, ct2_runs, step = best_decode_steps(s, args, [s.batch(rows)], [rows], n)
        tps = {k: args.rows / v for k, v in step.items()}
        best_ct2 = max(ct2_runs, key=lambda k: tps[k]) if ct2_runs else None
        _rates(summary, "batch64_tokens_per_s", tps, ct2_runs, best_ct2, 1)
        summary["batch64_greedy_equal"] = _agree(torch_runs, ct2_runs[best_ct2][0] if best_ct2 else None)
        print(json.dumps({k: v for k, v in summary.items() if "batch64" in k}), flush=True)
        limits.append(_limits(s))

        # beam 5 on E2E test inputs, batches of 10 sorted by length
        beam_prompts = sorted(s.prompts[: args.beam_inputs], key=len)
        groups = [beam_prompts[i : i + 10] for i in range(0, len(beam_prompts), 10)]
        torch_runs = run_torch(s, [s.batch(g) for g in groups], num_beams=5, max_new_tokens=60)
        ct2_runs = run_ct2(s, args, groups, 60, False, beam=5)
        seconds = {k: v[1] for k, v in torch_runs.items()}
        best_ct2 = min(ct2_runs, key=lambda k: ct2_runs[k][1]) if ct2_runs else None
        if best_ct2:
            seconds["ctranslate2"] = ct2_runs[best_ct2][1]
        summary |= {f"beam5_{k}_inputs_per_s": round(len(beam_prompts) / v, 3) for k, v in seconds.items()}
        summary["beam5_equal"] = _agree(torch_runs, ct2_runs[best_ct2][0] if best_ct2 else None)
        summary["decode_step"] = _step_note(s.model, s.decode_weights)
    summary |= floors(s.base, limits, summary, s.device)
    _write(args, summary)
    print(json.dumps(summary))
    return summary


def floors(base, limits: list[tuple[float, float]], summary: dict, device) -> dict:
    """The floors from the best copy bandwidth and matmul rate measured in the run (at its start and after
    each greedy measurement: the machine at its fastest, so a slow moment does not lower a floor). On a GPU
    whose peak is known, also the model FLOP utilization of the 64-row run against that peak."""
    bandwidth, flops = max(b for b, _ in limits), max(f for _, f in limits)
    params = sum(p.numel() for p in base.parameters())
    floor_ms = weight_bytes(base) / bandwidth * 1000
    floor_tps = flops / (2 * params)
    out = {
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "matmul_gflop_s": round(flops / 1e9, 1),
        "limits_measured": [[round(b / 1e9, 2), round(f / 1e9, 1)] for b, f in limits],
        "parameters": params,
        "bandwidth_floor_ms_per_token": round(floor_ms, 2),
        "flop_floor_tokens_per_s": round(floor_tps, 1),
        "batch1_vs_bandwidth_floor": round(summary["batch1_ms_per_token"] / floor_ms, 2),
        "batch64_vs_flop_floor": round(summary["batch64_tokens_per_s"] / floor_tps, 3),
    }
    if (peak := spec_peak(device)) is not None:
        out["spec_peak_tflop_s"] = round(peak / 1e12, 1)
        out["batch64_mfu"] = round(summary["batch64_tokens_per_s"] * 2 * params / peak, 4)
    return out


def _step_note(model, mode: str) -> str:
    """Which pass prefixtune ran over prompts and steps, and the memory its weight copies take."""
    from prefixtune.lean import step_for

    model.decode_weights = mode
    step = step_for(model)
    if step is None:
        return "transformers forward"
    return f"lean, {step.mode} weights (+{step.extra_bytes() / 2**20:.0f} MiB of copies)"


def _agree(torch_runs: dict, ct2: list | None) -> dict:
    """Fraction of outputs identical to prefixtune's, per other system measured."""
    ours = torch_runs["prefixtune"][0]
    others = {k: v[0] for k, v in torch_runs.items() if k != "prefixtune"}
    if ct2 is not None:
        others["ctranslate2"] = ct2
    return {k: round(sum(a == b for a, b in zip(ours, v)) / len(ours), 3) for k, v in others.items()}


COLUMNS = {
    "prefixtune": "prefixtune",
    "prefixtune_forward": "prefixtune, transformers forward",
    "hf_generate": "HF generate + prefix cache",
    "ctranslate2": "CTranslate2",
}


def _cells(s: dict, systems, measure: str) -> list[str]:
    """One table cell per system: its ``measure`` (CTranslate2 with its best setting)."""
    cells = []
    for name in systems:
        key = measure if name == "prefixtune" else f"{name}_{measure}"
        batch = measure.split("_")[0]
        cells.append(f"{s[key]} ({s[f'ctranslate2_{batch}_setting']})" if name == "ctranslate2" else f"{s[key]}")
    return cells


def _write(args, s: dict) -> None:
    systems = args.systems
    beam = [str(s[f"beam5_{name}_inputs_per_s"]) for name in systems]
    rows = [
        "| measure | " + " | ".join(COLUMNS[n] for n in systems) + " | floor | prefixtune ÷ floor |",
        "|---|" + "---|" * len(systems) + "---|---|",
        "| batch-1 greedy, ms/token (lower is better) | "
        + " | ".join(_cells(s, systems, "batch1_ms_per_token"))
        + f" | {s['bandwidth_floor_ms_per_token']} (bandwidth) | {s['batch1_vs_bandwidth_floor']}× |",
        f"| {args.rows}-row greedy, tokens/s | "
        + " | ".join(_cells(s, systems, "batch64_tokens_per_s"))
        + f" | {s['flop_floor_tokens_per_s']} (FLOPs) | {s['batch64_vs_flop_floor']} |",
        "| beam-5 E2E test, inputs/s | " + " | ".join(beam) + " | – | – |",
    ]
    where = f"{s['threads']} threads" if s["device"] == "cpu" else f"{s['device']} ({s.get('gpu', '')})"
    ct2 = f" (CTranslate2: {args.ct2_compute_types})" if "ctranslate2" in systems else ""
    static = " (CTranslate2: the same text as static_prompt)" if "ctranslate2" in systems else ""
    mfu = ""
    if "batch64_mfu" in s:
        mfu = f" {args.rows}-row MFU against the {s['spec_peak_tflop_s']} TFLOP/s bf16 peak: {s['batch64_mfu']}."
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(s, indent=1) + "\n")
    out.write_text(
        f"# bench_decode\n\n{s['model']}, {s['dtype']}{ct2}, {where}; prefixtune's pass over prompts and steps: "
        f"{s['decode_step']}; prefix = the keys and values of "
        f"{args.init_text!r}{static}. Greedy runs generate exactly "
        f"{s['new_tokens']} tokens per input, each greedy measurement best of {s['repeats']} rounds (the systems "
        f"taking turns). Measured in the same run (best of {len(s['limits_measured'])}, at its start and after "
        f"each greedy measurement: {s['limits_measured']} GB/s, GFLOP/s): copy bandwidth "
        f"{s['copy_bandwidth_gb_s']} GB/s, matmul {s['matmul_gflop_s']} GFLOP/s, {s['parameters']:,} parameters."
        f"{mfu}\n\n"
        + "\n".join(rows)
        + "\n\nGreedy rates are per decoding step: the time of all the tokens minus the time of the first "
        "(prompt and first token), so prompt processing counts in neither the rate nor the floor."
        + f"\n\nOutputs identical to prefixtune's (fraction): batch 1 {s['batch1_greedy_equal']}, "
        f"{args.rows} rows {s['batch64_greedy_equal']}, beam 5 {s['beam5_equal']}.\n"
        + (
            f"CTranslate2 settings tried: batch 1 {s['ctranslate2_batch1_all']}; "
            f"{args.rows} rows {s['ctranslate2_batch64_all']}.\n"
            if "ctranslate2" in systems
            else ""
        )
    )


if __name__ == "__main__":
    main()
