"""Decoding with prefixes: greedy, sampling and beam search over token ids.

Hugging Face ``generate`` cannot give each row its own prefix, nor start positions after a prefix
held in the cache, so the loops live here; they reuse transformers' logits processors and follow
its beam search (same top-2K candidate rule, length penalty and early-stop heuristic), so that a
prefix made of words decodes exactly like that text as a prompt. The paper decodes with beam 5.

This module knows nothing about text: it works on token ids only. Shapes: B rows, K beams, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from . import injection
from .errors import PrefixTuneError


@dataclass
class GenerationOptions:
    """Decoding options (names as in Hugging Face ``generate``).

    Attributes:
        max_new_tokens: Most tokens to generate per row.
        min_new_tokens: EOS is forbidden before this many new tokens.
        num_beams: Beam width; 1 is greedy (or sampling).
        do_sample: Sample instead of taking the most likely token.
        temperature: Softmax temperature when sampling.
        top_k: Keep the k most likely tokens when sampling (0 keeps all).
        top_p: Nucleus sampling mass (1.0 keeps all).
        length_penalty: Beam scores are divided by length ** length_penalty.
        no_repeat_ngram_size: Forbid repeating any n-gram of this size (0 = off).
        early_stopping: Beam search stops as soon as K hypotheses are finished.
        eos_token_id: Token id(s) that end a row; default from the model config.
        pad_token_id: Fills rows after they end; default from the config, else EOS.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    early_stopping: bool = False
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "num_beams"):
            if getattr(self, name) < 1:
                raise PrefixTuneError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("min_new_tokens", "top_k", "no_repeat_ngram_size"):
            if getattr(self, name) < 0:
                raise PrefixTuneError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise PrefixTuneError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PrefixTuneError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class DecodeState:
    """What decoding carries between steps, one row per sequence (or beam).

    Attributes:
        cache: The model cache (prefix + everything seen).
        mask: (B, P + T) 2D mask over the (decoder) self-attention keys.
        next_pos: (B,) position id of the next token (decoder-only models).
        encoder_hidden: (B, S, d) encoder states (encoder-decoder models).
        cross_mask: (B, 1, 1, P_cross + S) cross-attention mask (encoder-decoder models).
    """

    cache: Any
    mask: torch.Tensor
    next_pos: torch.Tensor | None = None
    encoder_hidden: torch.Tensor | None = None
    cross_mask: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> None:
        """Keep (and repeat) rows ``index`` (B',): beam reordering and expansion."""
        self.cache.reorder_cache(index)
        self.mask = self.mask[index]
        for name in ("next_pos", "encoder_hidden", "cross_mask"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index])


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def concat_states(states: list[DecodeState], cache_config) -> DecodeState:
    """Stack decode states of decoder-only models into one batch (continuous batching).

    Shorter histories are left-padded with masked zeros; positions are per row, so every row
    computes exactly what it would alone.
    """
    from transformers import DynamicCache

    if any(s.encoder_hidden is not None for s in states):
        raise PrefixTuneError("continuous batching supports decoder-only models")
    width = max(s.mask.shape[1] for s in states)
    cache = DynamicCache(config=cache_config)
    for i in range(len(states[0].cache.layers)):
        keys = torch.cat([_pad_left(s.cache.layers[i].keys, width, 2) for s in states])  # (B, H, S, D)
        values = torch.cat([_pad_left(s.cache.layers[i].values, width, 2) for s in states])
        cache.update(keys, values, i)
    mask = torch.cat([_pad_left(s.mask, width, 1) for s in states])  # (B, S)
    return DecodeState(cache, mask, next_pos=torch.cat([s.next_pos for s in states]))


def trim_state(state: DecodeState) -> None:
    """Drop leading positions that no row attends to (after rows have left the batch).

    Decoder-only only: encoder-decoder rows all start decoding together, so there is no padding to drop.
    """
    if state.encoder_hidden is not None:
        return
    used = state.mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else state.mask.shape[1]
    if start == 0:
        return
    for layer in state.cache.layers:
        layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
    state.mask = state.mask[:, start:]


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix) -> tuple[DecodeState, torch.Tensor]:
    """Process the inputs after each row's prefix.

    Args:
        input_ids: (B, T) left-padded inputs (the source, for encoder-decoder models).

    Returns:
        The decode state and the logits (B, V) for the first new token.
    """
    batch = model.batch_prefix(prefix, input_ids.shape[0])
    config = model.base.config
    if not model.geometry.is_encoder_decoder:
        dec = batch["decoder"]
        out = model.run_causal(input_ids, attention_mask, dec, logits_to_keep=1)
        state = DecodeState(
            out.cache,
            torch.cat([dec.mask, attention_mask.long()], dim=1),  # (B, P + T)
            next_pos=dec.lengths + attention_mask.long().sum(dim=1),  # (B,)
        )
        return state, out.logits[:, -1]
    hidden, key_mask = model.encode(input_ids, attention_mask, batch)
    queries = torch.zeros(input_ids.shape[0], 1, 1, device=model.device, dtype=model.dtype)  # shape only
    state = DecodeState(
        model.decoder_cache(batch),
        model.decoder_prefix_mask(batch, input_ids.shape[0]),
        encoder_hidden=hidden,
        cross_mask=injection.bidirectional_mask(config, queries, key_mask),  # (B, 1, 1, K)
    )
    start = torch.full((input_ids.shape[0],), config.decoder_start_token_id, device=model.device)
    return state, step(model, state, start)


def step(model, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
    """Feed one token per row (B,); returns the logits (B, V) for the next one."""
    ones = torch.ones(len(tokens), 1, dtype=torch.long, device=tokens.device)
    state.mask = torch.cat([state.mask, ones], dim=1)  # (B, P + T + 1)
    if state.encoder_hidden is None:
        out = model.base(
            input_ids=tokens[:, None],
            attention_mask=state.mask,
            position_ids=state.next_pos[:, None],
            cache=state.cache,
            use_cache=True,
        )
        state.next_pos = state.next_pos + 1
    else:
        out = model.base(
            encoder_outputs=(state.encoder_hidden,),
            attention_mask=state.cross_mask,
            decoder_input_ids=tokens[:, None],
            decoder_attention_mask=state.mask,
            cache=state.cache,
            use_cache=True,
        )
    return out.logits[:, -1]


def sampling_warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """Transformers' temperature, top-k and top-p warpers (they read only the scores)."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def _processors(opts: GenerationOptions, prompt_len: int, eos: list[int], sampling: bool) -> LogitsProcessorList:
    procs = LogitsProcessorList()
    if opts.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(opts.no_repeat_ngram_size))
    if opts.min_new_tokens > 0 and eos:
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, opts.min_new_tokens, eos))
    if sampling:
        procs.extend(sampling_warpers(opts.temperature, opts.top_k, opts.top_p))
    return procs


def generate(
    model, input_ids, attention_mask=None, prefix=None, generator: torch.Generator | None = None, **kwargs
) -> torch.Tensor:
    """Generate with each row's prefix; returns ids as Hugging Face ``generate`` does.

    Args:
        model: A :class:`prefixtune.PrefixTunedModel`.
        input_ids: (B, T) inputs, left-padded for decoder-only models.
        attention_mask: (B, T); default all ones.
        prefix: A prefix name, one per row, or None for the active prefix.
        generator: Random generator for sampling.
        **kwargs: Fields of :class:`GenerationOptions`.

    Returns:
        Decoder-only: (B, T + N) inputs then new tokens. Encoder-decoder: (B, 1 + N) decoder start
        then new tokens. Rows that end early are filled with the pad id.
    """
    unknown = set(kwargs) - {f.name for f in fields(GenerationOptions)}
    if unknown:
        raise PrefixTuneError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    opts = GenerationOptions(**kwargs)
    config = model.base.config
    eos = opts.eos_token_id if opts.eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = opts.pad_token_id if opts.pad_token_id is not None else getattr(config, "pad_token_id", None)
    pad = pad if pad is not None else (eos[0] if eos else 0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            state, logits = prefill(model, input_ids, attention_mask, prefix)
            if model.geometry.is_encoder_decoder:
                prompt = torch.full((len(input_ids), 1), config.decoder_start_token_id, device=input_ids.device)
            else:
                prompt = input_ids
            if opts.num_beams > 1:
                return _beam_search(model, state, logits, prompt, opts, eos, pad)
            return _sample(model, state, logits, prompt, opts, eos, pad, generator)
    finally:
        model.train(was_training)


def _sample(model, state, logits, prompt, opts, eos, pad, generator) -> torch.Tensor:
    """Greedy decoding or sampling, as Hugging Face ``_sample``; finished rows leave the batch."""
    procs = _processors(opts, prompt.shape[1], eos, opts.do_sample)
    eos_t = torch.tensor(eos, device=prompt.device)
    out = torch.full((len(prompt), prompt.shape[1] + opts.max_new_tokens), pad, dtype=torch.long, device=prompt.device)
    out[:, : prompt.shape[1]] = prompt
    width = prompt.shape[1]
    alive = torch.arange(len(prompt), device=prompt.device)  # batch rows still decoding
    seqs = prompt
    for i in range(opts.max_new_tokens):
        scores = procs(seqs, logits.float())  # (B', V)
        if opts.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)[:, 0]
        else:
            tokens = scores.argmax(dim=-1)
        seqs = torch.cat([seqs, tokens[:, None]], dim=1)
        out[alive, prompt.shape[1] + i] = tokens
        width = prompt.shape[1] + i + 1
        going = ~torch.isin(tokens, eos_t)  # (B',)
        if not going.any() or i == opts.max_new_tokens - 1:
            break
        if not going.all():
            keep = going.nonzero()[:, 0]
            alive, seqs, tokens = alive[keep], seqs[keep], tokens[keep]
            state.select(keep)
            trim_state(state)
        logits = step(model, state, tokens)
    return out[:, :width]


def _beam_search(model, state, logits, prompt, opts, eos, pad) -> torch.Tensor:
    """Beam search following Hugging Face's (vectorized) implementation, early_stopping=False heuristic.

    Same results as Hugging Face, less work: a row leaves the batch as soon as its best K
    hypotheses are final, instead of being recomputed until the last row ends.
    """
    batch, k = prompt.shape[0], opts.num_beams
    vocab = logits.shape[-1]
    prompt_len = prompt.shape[1]
    max_len = prompt_len + opts.max_new_tokens
    device = prompt.device
    keep = max(2, 1 + len(eos)) * k  # candidates kept per row, so K survive after EOS hits
    top_k_mask = torch.arange(keep, device=device) < k  # (2K,)
    eos_t = torch.tensor(eos, device=device)
    procs = _processors(opts, prompt_len, eos, sampling=False)

    expand = torch.arange(batch, device=device).repeat_interleave(k)  # (B*K,)
    state.select(expand)
    logits = logits[expand]
    running = torch.full((batch, k, max_len), pad, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = prompt[:, None]
    running_scores = torch.zeros(batch, k, device=device)
    running_scores[:, 1:] = -1e9
    finished_seqs = running.clone()
    finished_scores = torch.full((batch, k), -1e9, device=device)
    finished_len = torch.zeros(batch, k, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)[:, None]
    alive = torch.arange(batch, device=device)  # batch rows still searching
    out_seqs = torch.full((batch, max_len), pad, dtype=torch.long, device=device)
    out_len = torch.zeros(batch, dtype=torch.long, device=device)
    cur = prompt_len
    while True:
        flat_seqs = running[:, :, :cur].reshape(batch * k, cur)  # (B*K, cur)
        log_probs = procs(flat_seqs, torch.log_softmax(logits.float(), dim=-1))  # (B*K, V)
        log_probs = (log_probs.view(batch, k, vocab) + running_scores[:, :, None]).view(batch, k * vocab)
        top_scores, top_index = torch.topk(log_probs, keep)  # (B, 2K)
        source = top_index // vocab  # beam each candidate extends, (B, 2K)
        tokens = top_index % vocab
        cand = running[rows, source]  # (B, 2K, max_len)
        cand[:, :, cur] = tokens
        hits = torch.isin(tokens, eos_t) | (cur + 1 >= max_len)  # (B, 2K)

        # Running beams for the next step: the best K candidates that did not stop.
        alive_scores = top_scores - hits.float() * 1e9
        pick = torch.topk(alive_scores, k).indices  # (B, K)
        running = cand[rows, pick]
        running_scores = alive_scores.gather(1, pick)
        beam_source = source.gather(1, pick)

        # Finished hypotheses: merge the new ones (among the top K) with the kept ones.
        generated = cur + 1 - prompt_len
        done_scores = top_scores / (generated**opts.length_penalty)
        done_scores = done_scores - (~improvable).float() * 1e9
        done_scores = done_scores - (~(hits & top_k_mask)).float() * 1e9
        if opts.early_stopping:
            done_scores = done_scores - is_finished.all(dim=1, keepdim=True).float() * 1e9
        merged_scores = torch.cat([finished_scores, done_scores], dim=1)  # (B, 3K)
        best = torch.topk(merged_scores, k).indices
        finished_seqs = torch.cat([finished_seqs, cand], dim=1)[rows, best]
        finished_len = torch.cat([finished_len, torch.full_like(done_scores, generated, dtype=torch.long)], 1)[
            rows, best
        ]
        is_finished = torch.cat([is_finished, hits & top_k_mask], dim=1)[rows, best]
        finished_scores = merged_scores.gather(1, best)

        cur += 1
        best_running = running_scores[:, :1] / ((cur - prompt_len) ** opts.length_penalty)
        worst_done = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1e9)
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        stop_all = opts.early_stopping and bool(is_finished.all())
        if not improvable.any() or stop_all or bool(hits.all()) or cur >= max_len:
            break
        # Rows whose best K can no longer change leave the batch (Hugging Face keeps computing them).
        going = improvable[:, 0] & ~(opts.early_stopping & is_finished.all(dim=1))  # (B',)
        kept = going.nonzero()[:, 0]
        if len(kept) < len(going):
            done = (~going).nonzero()[:, 0]
            out_seqs[alive[done]], out_len[alive[done]] = finished_seqs[done, 0], finished_len[done, 0]
            alive, running, running_scores = alive[kept], running[kept], running_scores[kept]
            finished_seqs, finished_scores = finished_seqs[kept], finished_scores[kept]
            finished_len, is_finished, improvable = finished_len[kept], is_finished[kept], improvable[kept]
            beam_source, batch = beam_source[kept], len(kept)
            rows = torch.arange(batch, device=device)[:, None]
        reorder = (beam_source + kept[:, None] * k).view(-1)  # (B'*K,) beams of the kept rows
        state.select(reorder)
        if len(kept) < len(going):
            trim_state(state)
        logits = step(model, state, running[:, :, cur - 1].reshape(-1))
    out_seqs[alive], out_len[alive] = finished_seqs[:, 0], finished_len[:, 0]
    return out_seqs[:, : prompt_len + int(out_len.max())]
