"""Decoding speed, side by side: prefixtune vs PEFT's ``generate`` on batched beam-5 E2E test decoding.

Three systems decode the same E2E test inputs (unique MRs, first ``--limit``), sorted by length into
the same batches, with the same trained prefix (benchmarks/results/lowdata-e2e-200, converted for
PEFT with ``export_peft``), beam 5, the same EOS and length limit:
- prefixtune ``generate``;
- PEFT ``generate``, as PEFT users call it;
- Hugging Face ``generate`` with the prefix handed over as a pre-filled cache: what PEFT's
  ``generate`` means to do. Its outputs must equal prefixtune's token for token (beam and greedy),
  so its tokens/s compare the same work.
Also checks greedy outputs against PEFT's own forward pass (full recomputation, one input at a time),
and whether PEFT's ``generate`` actually puts the prefix in the cache. Prints one JSON line last and
writes benchmarks/results/generate.md.

    python benchmarks/bench_generate.py [--limit 100] [--batch-size 10]

Needs the `peft` package (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data" / "e2e"
PREFIX = HERE / "results" / "lowdata-e2e-200"


def _setup(args):
    from prefixtune import PrefixTunedModel, load_base
    from prefixtune.data import load_examples
    from prefixtune.features import Formatter, context_length

    base, tok = load_base(args.model)
    model = PrefixTunedModel(base, tok)
    model.load_prefix(args.prefix, name="default")
    model.eval()
    sources = list(dict.fromkeys(e.source for e in load_examples("e2e", args.data, "test")))[: args.limit]
    fmt = Formatter(tok, False, context_length(base.config), model.get_prefix("default").num_tokens)
    prompts = sorted((fmt.source_ids(s) for s in sources), key=len)
    return model, tok, fmt, prompts


def _batches(prompts, size, pad_id):
    from prefixtune.features import left_pad

    return [left_pad(prompts[i : i + size], pad_id) for i in range(0, len(prompts), size)]


def _until(tokens: list[int], stop: set[int]) -> list[int]:
    """The tokens before the first of ``stop`` (EOS, padding)."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[:i]
    return tokens


def _decode(generate, batches, stop: set[int]) -> tuple[list[list[int]], float]:
    """Run ``generate(ids, mask)`` over the batches; returns the new tokens per input (to EOS) and the seconds."""
    outputs, start = [], time.perf_counter()
    for ids, mask in batches:
        out = generate(ids, mask)
        outputs.extend(_until(row.tolist(), stop) for row in out[:, ids.shape[1] :])
    return outputs, time.perf_counter() - start


def _forward_greedy(peft_model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding by PEFT's forward pass on the whole sequence at every step (no cache, no padding)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            token = int(peft_model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if token == eos:
                break
            seq.append(token)
    return seq[len(prompt) :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--prefix", default=str(PREFIX), help="trained prefix folder")
    ap.add_argument("--data", default=str(DATA), help="E2E release folder")
    ap.add_argument("--limit", type=int, default=100, help="E2E test inputs to decode (default: 100)")
    ap.add_argument("--batch-size", type=int, default=10, help="inputs per batch, both systems (default: 10)")
    ap.add_argument("--num-beams", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--greedy-check", type=int, default=12, help="inputs for the greedy identity check")
    ap.add_argument("--output", default=str(HERE / "results" / "generate.md"))
    args = ap.parse_args()
    from peft import PeftModel

    from prefixtune.interop import export_peft

    torch.manual_seed(0)
    model, tok, fmt, prompts = _setup(args)
    pad = tok.pad_token_id
    stop = {pad, fmt.eos}
    opts = dict(max_new_tokens=args.max_new_tokens, eos_token_id=fmt.eos, pad_token_id=pad)
    batches = _batches(prompts, args.batch_size, pad)
    with tempfile.TemporaryDirectory() as tmp:
        export_peft(args.prefix, Path(tmp) / "peft")
        peft_model = PeftModel.from_pretrained(model.base, Path(tmp) / "peft").eval()

    def ours(ids, mask, beams=args.num_beams):
        return model.generate(ids, mask, num_beams=beams, **opts)

    def theirs(ids, mask, beams=args.num_beams):
        with torch.no_grad():
            return peft_model.generate(input_ids=ids, attention_mask=mask, num_beams=beams, do_sample=False, **opts)

    flat = model.get_prefix("default").flat_state()["decoder"]  # (P, L, 2, kv_heads, D)

    def hf_cache(ids, mask, beams=args.num_beams):
        from transformers import DynamicCache

        cache, rows = DynamicCache(config=model.base.config), len(ids) * beams  # generate expands inputs, not caches
        for layer in range(flat.shape[1]):
            keys, values = (flat[:, layer, i].transpose(0, 1)[None].expand(rows, -1, -1, -1) for i in (0, 1))
            cache.update(keys.contiguous(), values.contiguous(), layer)
        full_mask = torch.cat([mask.new_ones(len(ids), flat.shape[0]), mask], dim=1)
        with torch.no_grad():
            return model.base.generate(
                input_ids=ids, attention_mask=full_mask, past_key_values=cache, num_beams=beams, do_sample=False, **opts
            )

    def bare(ids, mask):  # the base model alone, no prefix
        with peft_model.disable_adapter(), torch.no_grad():
            return peft_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **opts)

    # Greedy identity on a few inputs, before timing.
    check = prompts[: args.greedy_check]
    greedy_batches = _batches(check, args.batch_size, pad)
    ours_greedy, _ = _decode(lambda i, m: ours(i, m, beams=1), greedy_batches, stop)
    seen = []  # cache length at each call of the base model: is the prefix in PEFT's cache?
    hook = model.base.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["cache"].get_seq_length() if kw.get("cache") is not None else 0),
        with_kwargs=True,
    )
    peft_gen_greedy, _ = _decode(lambda i, m: theirs(i, m, beams=1), greedy_batches[:1], stop)
    hook.remove()
    bare_greedy, _ = _decode(bare, greedy_batches[:1], stop)
    reference = [_forward_greedy(peft_model, p, args.max_new_tokens, fmt.eos) for p in check]

    hf_greedy, _ = _decode(lambda i, m: hf_cache(i, m, beams=1), greedy_batches, stop)

    ours_out, ours_s = _decode(ours, batches, stop)
    hf_out, hf_s = _decode(hf_cache, batches, stop)
    peft_out, peft_s = _decode(theirs, batches, stop)
    ours_tokens, peft_tokens, hf_tokens = sum(map(len, ours_out)), sum(map(len, peft_out)), sum(map(len, hf_out))
    summary = {
        "benchmark": "generate",
        "inputs": len(prompts),
        "batch_size": args.batch_size,
        "num_beams": args.num_beams,
        "prefixtune_tokens_per_s": round(ours_tokens / ours_s, 2),
        "peft_tokens_per_s": round(peft_tokens / peft_s, 2),
        "speedup_vs_peft": round((ours_tokens / ours_s) / (peft_tokens / peft_s), 3),
        "prefixtune_inputs_per_s": round(len(prompts) / ours_s, 3),
        "peft_inputs_per_s": round(len(prompts) / peft_s, 3),
        "speedup_vs_peft_inputs": round(peft_s / ours_s, 3),
        "hf_cache_tokens_per_s": round(hf_tokens / hf_s, 2),
        "speedup_vs_hf_cache": round(hf_s / ours_s, 3),
        "beam_outputs_identical_to_hf_cache": ours_out == hf_out,
        "greedy_identical_to_hf_cache": ours_greedy == hf_greedy,
        "prefixtune_seconds": round(ours_s, 1),
        "hf_cache_seconds": round(hf_s, 1),
        "peft_seconds": round(peft_s, 1),
        "greedy_identical_to_peft_forward": ours_greedy == reference,
        "peft_generate_greedy_identical_to_peft_forward": peft_gen_greedy == reference[: len(peft_gen_greedy)],
        "peft_generate_prefix_in_cache": bool(seen) and seen[0] > 0,
        "peft_generate_equals_bare_model": peft_gen_greedy == bare_greedy,
        "sample_prefixtune": tok.decode(ours_out[0], skip_special_tokens=True),
        "sample_peft": tok.decode(peft_out[0], skip_special_tokens=True),
    }
    _write_table(args, summary)
    print(json.dumps(summary))


def _write_table(args, s) -> None:
    rows = [
        "| system | tokens/s | inputs/s | seconds | first output |",
        "|---|---|---|---|---|",
        f"| prefixtune | {s['prefixtune_tokens_per_s']} | {s['prefixtune_inputs_per_s']} | "
        f"{s['prefixtune_seconds']} | {s['sample_prefixtune']!r} |",
        f"| HF generate + prefix cache | {s['hf_cache_tokens_per_s']} | {round(s['inputs'] / s['hf_cache_seconds'], 3)}"
        f" | {s['hf_cache_seconds']} | (identical to prefixtune: {s['beam_outputs_identical_to_hf_cache']}) |",
        f"| PEFT generate | {s['peft_tokens_per_s']} | {s['peft_inputs_per_s']} | {s['peft_seconds']} | "
        f"{s['sample_peft']!r} |",
    ]
    checks = [
        f"- prefixtune beam-{args.num_beams} outputs == HF generate + prefix cache: "
        f"**{s['beam_outputs_identical_to_hf_cache']}**; greedy: **{s['greedy_identical_to_hf_cache']}**",
        f"- prefixtune greedy == PEFT forward greedy: **{s['greedy_identical_to_peft_forward']}**",
        f"- PEFT `generate` greedy == PEFT forward greedy: **{s['peft_generate_greedy_identical_to_peft_forward']}**",
        f"- PEFT `generate` puts the prefix in the cache (cache length > 0 at its first forward): "
        f"**{s['peft_generate_prefix_in_cache']}**",
        f"- PEFT `generate` greedy == the bare model without prefix: **{s['peft_generate_equals_bare_model']}**",
    ]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# bench_generate\n\n{s['inputs']} E2E test inputs, batches of {args.batch_size} sorted by length, beam "
        f"{args.num_beams}, at most {args.max_new_tokens} new tokens, prefix {args.prefix}.\n\n"
        + "\n".join(rows)
        + f"\n\nspeed-up vs PEFT generate: {s['speedup_vs_peft']}× tokens/s, {s['speedup_vs_peft_inputs']}× inputs/s; "
        f"vs HF generate + prefix cache (same outputs, same work): {s['speedup_vs_hf_cache']}×\n\n"
        + "\n".join(checks)
        + "\n"
    )


if __name__ == "__main__":
    main()
