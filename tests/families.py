"""Every causal-LM and encoder-decoder family of the installed transformers, as tiny models (issue 15, point 4).

``tiny_config(model_type)`` shrinks a family's default config (only fields it has: widths, layers,
heads, experts, vocabulary) so the model builds in a fraction of a second; ``check(model_type)``
runs the oracles on it and returns one row of the support table:

* ``prompt``: a prefix from real words equals the discrete prompt (decoder-only), or reproduces the
  frozen model's own activations on every stack (encoder-decoder);
* ``mixed``: a batch mixing prefixes of different lengths, with padded inputs, equals each row alone;
* ``greedy``: cached greedy decoding equals a manual loop of full forward passes;
* ``trains``: a training step changes only the prefix, and lowers the loss.

``python tests/families.py`` runs every family and writes ``tests/data/families.json`` (what the
test suite checks against) and the README's support table (``docs/families.md``);
``python tests/families.py NAME ...`` re-runs only those families and updates their rows.
"""

from __future__ import annotations

import json
import signal
import sys
import traceback
import warnings
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from prefixtune.state import decoder_start

HERE = Path(__file__).parent
RECORD = HERE / "data" / "families.json"
TABLE = HERE.parent / "docs" / "families.md"
VOCAB = 96
SMALL = {
    # widths
    "hidden_size": 32,
    "d_model": 32,
    "n_embd": 32,
    "dim": 32,
    "embed_dim": 32,
    "model_dim": 32,
    "emb_dim": 32,
    "intermediate_size": 64,
    "ffn_dim": 64,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "d_ff": 64,
    "n_inner": 64,
    "ffn_hidden_size": 64,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "intermediate_size_mlp": 64,
    "word_embed_proj_dim": 32,
    "embedding_size": 32,
    "d_inner": 64,
    # depth
    "num_hidden_layers": 2,
    "n_layer": 2,
    "num_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_decoder_layers": 2,
    "n_layers": 2,
    # heads
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "d_kv": 8,
    "kv_channels": 8,
    "multi_query_group_num": 2,
    "attention_head_dim": 8,
    # experts
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "top_k": 2,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "moe_k": 2,
    "num_experts_per_token": 2,
    "num_expert_group": 1,
    "linear_head_dim": 8,
    "linear_num_heads": 4,
    # latent attention
    "q_lora_rank": 16,
    "kv_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    # windows, so that prefixes and inputs cross them
    "sliding_window": 4,
    "attention_chunk_size": 4,
    # tokens
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "n_positions": 128,
    "n_ctx": 128,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 0,
    "forced_eos_token_id": None,
    "forced_bos_token_id": None,
}
WORDS = "a longer prompt"  # 15 tokens with the test tokenizer


def families() -> list[str]:
    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) | set(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES))


def _shrunk(defaults: dict) -> dict:
    out = {}
    for key, value in defaults.items():
        if key in SMALL and (value is None or isinstance(value, (int, float))) and not isinstance(value, bool):
            out[key] = SMALL[key]
        elif isinstance(value, dict) and "model_type" in value:
            out[key] = {**value, **_shrunk(value)}
            out[key].pop("layer_types", None)
        elif key == "per_layer_config" and value:  # keep one layer that differs, as the last of the 2
            last = value[max(value)]
            out[key] = {"01": {k: 16 if k == "head_dim" else SMALL.get(k, v) for k, v in last.items()}}
    recurrent = {"linear_attention", "conv", "mamba", "hybrid"}
    if recurrent & set(defaults.get("layer_types") or []) or "attn_layer_period" in defaults:
        for key in ("num_hidden_layers", "num_layers", "n_layer"):
            if key in out:
                out[key] = 8  # hybrids: enough layers for their pattern to include attention
    if defaults.get("num_kv_shared_layers"):  # KV sharing: 4 layers with their own cache, 2 reading theirs
        out.update(num_hidden_layers=6, num_kv_shared_layers=2)
        if "layer_types" in defaults:
            out["layer_types"] = ["sliding_attention", "full_attention"] * 3
    layers = out.get("num_hidden_layers")
    for key, value in defaults.items():  # per-layer lists (Gemma 3n's widths, sparsity): one value per layer
        widths = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        fractions = isinstance(value, list) and all(isinstance(v, float) for v in value)
        if layers and ((key in SMALL and widths) or fractions) and len(value) == defaults["num_hidden_layers"]:
            out[key] = [SMALL.get(key, value[-1])] * layers
    if "is_decoder" in defaults and not defaults.get("is_encoder_decoder"):
        out["is_decoder"] = True  # encoder families used as causal LMs (BERT, RoFormer, ...)
    if "rotary_dim" in defaults:
        out["rotary_dim"] = 4
    if defaults.get("is_encoder_decoder") and "decoder_start_token_id" not in defaults:
        out["decoder_start_token_id"] = 0
    elif defaults.get("decoder_start_token_id") not in (None, defaults.get("pad_token_id")):
        out["decoder_start_token_id"] = 2  # not the padding token, as in the family (M2M100-style positions skip it)
    if "kv_lora_rank" in out:  # latent attention: rotary sized by head_dim, one KV head per query head
        out.update(head_dim=out.get("qk_rope_head_dim", 4), num_key_value_heads=out.get("num_attention_heads", 4))
    return out


def tiny_config(model_type: str):
    """The family's default config, shrunk; raises if the family cannot be configured that way."""
    cls = CONFIG_MAPPING[model_type]
    shrunk = _shrunk(cls().to_dict())
    try:
        return cls(**shrunk)
    except Exception:  # noqa: BLE001 - a per-layer override the family does not accept at this size: drop it
        if "per_layer_config" not in shrunk:
            raise
        return cls(**{k: v for k, v in shrunk.items() if k != "per_layer_config"})


def tiny_base(model_type: str):
    torch.manual_seed(0)
    config = tiny_config(model_type)
    seq2seq = model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    return auto.from_config(config).eval()


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout


def check(model_type: str, seconds: int = 60) -> dict:
    """One row of the support table: status ``supported``, ``refused`` (prefixtune's error, quoted),
    ``fails`` (an oracle or an unexpected error) or ``no tiny model`` (transformers cannot build it)."""
    from tiny import TinyTokenizer

    from prefixtune import PrefixConfig, PrefixTunedModel, PrefixTuneError

    row = {"family": model_type}
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                base = tiny_base(model_type)
            except _Timeout:
                raise
            except Exception as e:  # noqa: BLE001 - transformers' own limits, recorded as such
                return {**row, "status": "no tiny model", "note": f"{type(e).__name__}: {str(e)[:120]}"}
            row["kind"] = "encoder-decoder" if base.config.is_encoder_decoder else "decoder-only"
            tok = TinyTokenizer()
            try:
                model = PrefixTunedModel.wrap(base, PrefixConfig(init_text=WORDS), tok, name="A")
            except PrefixTuneError as e:
                return {**row, "status": "refused", "note": str(e)[:200]}
            failed = [name for name, oracle in ORACLES.items() if not _passes(oracle, model, base)]
            if failed:
                return {**row, "status": "fails", "note": "oracles failed: " + ", ".join(failed)}
            note = ""
            if not model.geometry.is_encoder_decoder and model.layout.recurrent:
                layout = model.layout
                note = (
                    f"hybrid: prefix on the {len(layout.attention_indices)} attention layers of {layout.num_layers} "
                    f"({layout.num_recurrent} {', '.join(layout.recurrent_types)} layers start empty); "
                    "words ≡ prompt does not apply"
                )
            return {**row, "status": "supported", "note": note}
    except _Timeout:
        return {**row, "status": "fails", "note": f"over {seconds} s"}
    except Exception as e:  # noqa: BLE001 - recorded: the table says what breaks
        last = traceback.extract_tb(e.__traceback__)[-1]
        return {**row, "status": "fails", "note": f"{type(e).__name__}: {str(e)[:120]} ({Path(last.filename).name})"}
    finally:
        signal.alarm(0)


def _passes(oracle, model, base) -> bool:
    try:
        return bool(oracle(model, base))
    except AssertionError:
        return False


def _words():
    from tiny import TinyTokenizer

    return torch.tensor([TinyTokenizer()(WORDS, add_special_tokens=False)["input_ids"]])


def oracle_prompt(model, base) -> bool:
    if not model.geometry.is_encoder_decoder and model.layout.recurrent:
        return True  # recurrent layers do not see a prefix: it is not a prompt there (the table says so)
    x = torch.tensor([[5, 9, 17, 33, 4, 60, 7, 8]])
    with torch.no_grad():
        if not model.geometry.is_encoder_decoder:
            got = model(x, prefix="A").logits
            want = base(torch.cat([_words(), x], dim=1)).logits[:, _words().shape[1] :]
            return torch.allclose(got, want, atol=1e-4, rtol=0)
        targets = model._activations(_words(), "kv")
        params = model.get_prefix("A")()
        return all(torch.allclose(params[k].float(), targets[k].float(), atol=1e-4) for k in targets)


def _with_second_prefix(model):
    from prefixtune import PrefixConfig

    if not model.has_prefix("B"):
        torch.manual_seed(1)
        model.add_prefix("B", PrefixConfig(num_virtual_tokens=3, init_std=0.5, reparameterize=False))
    return model


def oracle_mixed(model, base) -> bool:
    model = _with_second_prefix(model)
    names = ["A", "B", "B"] if model.mixes_prefix_lengths else ["B", "B", "B"]
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        if model.geometry.is_encoder_decoder:
            dec = torch.tensor([[0, 5, 6, 7]] * 3)
            mixed = model(ids, mask, prefix=names, decoder_input_ids=dec).logits
            alone = [
                model(torch.tensor([r]), prefix=n, decoder_input_ids=dec[:1]).logits[0] for r, n in zip(rows, names)
            ]
            return all(torch.allclose(mixed[i], a, atol=1e-4, rtol=0) for i, a in enumerate(alone))
        mixed = model(ids, mask, prefix=names).logits
        alone = [model(torch.tensor([r]), prefix=n).logits[0] for r, n in zip(rows, names)]
        return all(
            torch.allclose(mixed[i][: len(r)], a, atol=1e-4, rtol=0) for i, (r, a) in enumerate(zip(rows, alone))
        )


def oracle_greedy(model, base) -> bool:
    ids = torch.tensor([[5, 6, 7, 8]])
    got = model.generate(ids, prefix="A", max_new_tokens=6, eos_token_id=[])
    enc_dec = model.geometry.is_encoder_decoder
    out = torch.tensor([[decoder_start(base)]]) if enc_dec else ids
    with torch.no_grad():
        for _ in range(6):
            if enc_dec:
                logits = model(ids, decoder_input_ids=out, prefix="A").logits
            else:
                logits = model(out, prefix="A").logits
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return got.tolist() == out.tolist()


def oracle_trains(model, base) -> bool:
    frozen = {n: p.detach().clone() for n, p in base.named_parameters()}
    prefix = model.get_prefix("A")
    before_prefix = [p.detach().clone() for p in prefix.parameters()]
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model.active = "A"
    model.train()
    optimizer = torch.optim.SGD([p for p in prefix.parameters() if p.requires_grad], lr=0.1)
    kwargs = {"labels": ids}
    loss = model(ids, prefix="A", **kwargs).loss
    loss.backward()
    optimizer.step()
    model.eval()
    changed = any(not torch.equal(a, b) for a, b in zip(before_prefix, prefix.parameters()))
    untouched = all(torch.equal(p, frozen[n]) for n, p in base.named_parameters())
    return changed and untouched


ORACLES = {"prompt": oracle_prompt, "mixed": oracle_mixed, "greedy": oracle_greedy, "trains": oracle_trains}


def write(rows: list[dict]) -> None:
    RECORD.write_text(json.dumps(rows, indent=1) + "\n")
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [
        "# Model families and prefixtune",
        "",
        "Every causal-LM and encoder-decoder family of the installed transformers, built from a shrunk",
        "default config and run through the oracles of `tests/families.py` (a prefix from words ≡ the",
        "prompt, a mixed batch ≡ each row alone, cached greedy ≡ a manual loop, only the prefix trains).",
        "Regenerate with `python tests/families.py`; `tests/test_families.py` checks every row.",
        "",
        "Totals: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + ".",
        "",
        "| family | kind | status | notes |",
        "|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("note", "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['family']} | {r.get('kind', '')} | {r['status']} | {note} |")
    TABLE.parent.mkdir(exist_ok=True)
    TABLE.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    wanted = sys.argv[1:] or families()
    results = []
    for name in wanted:
        row = check(name)
        results.append(row)
        print(json.dumps(row), flush=True)
    if sys.argv[1:]:  # only these families: update their rows of the record
        rows = {row["family"]: row for row in json.loads(RECORD.read_text())}
        rows.update({row["family"]: row for row in results})
        results = [rows[name] for name in families()]
    write(results)
