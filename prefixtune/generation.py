"""Decoding with prefixes: greedy, sampling and beam search over token ids.

Hugging Face ``generate`` cannot give each row its own prefix, nor start positions after a prefix
held in the cache, so the loops live here; they reuse transformers' logits processors and follow
its beam search (same top-2K candidate rule, length penalty and early-stop heuristic), so that a
prefix made of words decodes exactly like that text as a prompt. The paper decodes with beam 5.

This module knows nothing about text: it works on token ids only. Shapes: B rows, K beams, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .errors import PrefixTuneError
from .options import GenerationOptions
from .state import PrefixedState, decoder_start

__all__ = [
    "GenerationOptions",
    "TokenChooser",
    "TokenLogprob",
    "choose_rows",
    "eos_and_pad",
    "generate",
    "sequence_logprobs",
]


class _HoldEos(LogitsProcessor):
    """transformers' ``MinNewTokensLengthLogitsProcessor``, same scores: the end-of-sequence tokens get -inf
    until ``min_new_tokens`` tokens follow the prompt. Theirs compares the whole vocabulary with the EOS ids
    at every call (up to 9% of a 64-row decoding step in one profile here); this writes the EOS columns only."""

    def __init__(self, prompt_len: int, min_new_tokens: int, eos: list[int]) -> None:
        self.prompt_len, self.min_new_tokens, self.eos = prompt_len, min_new_tokens, list(eos)

    def holds(self, generated: int) -> bool:
        return generated < self.min_new_tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.holds(input_ids.shape[-1] - self.prompt_len):
            return scores
        scores = scores.clone()
        scores[:, self.eos] = -float("inf")
        return scores


def _processors(opts: GenerationOptions, prompt_len: int, eos: list[int], sampling: bool) -> LogitsProcessorList:
    """Transformers' processors for ``opts``, in the order Hugging Face ``generate`` applies them."""
    procs = LogitsProcessorList()
    if opts.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(opts.repetition_penalty))
    if opts.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(opts.no_repeat_ngram_size))
    if opts.min_new_tokens > 0 and eos:
        procs.append(_HoldEos(prompt_len, opts.min_new_tokens, eos))
    if sampling:
        if opts.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(opts.temperature))
        if opts.top_k > 0:
            procs.append(TopKLogitsWarper(opts.top_k))
        if opts.top_p < 1.0:
            procs.append(TopPLogitsWarper(opts.top_p))
    return procs


class TokenChooser:
    """Picks the next token of rows that share options: greedy or sampled, after every processor.

    The one implementation of per-token decoding: offline :func:`generate` uses one per batch, the
    server's engine one per request (with the request's own generator), so both choose alike.

    Args:
        opts: The options.
        prompt_len: Length of the rows' prompts as ``seqs`` will hold them (min_new_tokens counts from there).
        eos: End-of-sequence ids.
        generator: Random generator for sampling.
    """

    def __init__(self, opts: GenerationOptions, prompt_len: int, eos: list[int], generator=None) -> None:
        self.procs = _processors(opts, prompt_len, eos, opts.do_sample)
        self.sample, self.generator = opts.do_sample, generator
        # Greedy with nothing that reads the tokens so far (EOS held back at most): rows like this are
        # chosen together by :func:`choose_rows`, without their histories.
        self.plain = not self.sample and all(isinstance(p, _HoldEos) for p in self.procs)

    def __call__(self, seqs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """seqs (B, t) the prompts and tokens so far, logits (B, V) → tokens (B,)."""
        scores = self.procs(seqs, _numbers(logits).float())
        if self.sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=self.generator)[:, 0]
        return argmax_rows(scores)


def choose_rows(choosers: list[TokenChooser], generated: list[int], logits: torch.Tensor, seq) -> list:
    """The next token of each row, each row with its own chooser; a row that cannot choose gets its exception.

    Rows whose choosers are ``plain`` (greedy, EOS held back until their minimum length at most) are chosen
    by one argmax over all of them; the others one by one, each reading its tokens so far from ``seq(i)``
    ((1, t): prompt then generated tokens). Either way a row gets exactly the token its chooser gives it alone.

    Args:
        choosers: One per row.
        generated: Tokens each row has generated so far.
        logits: (B, V) the rows' scores.
        seq: Row index → (1, t) its prompt and tokens so far, for choosers that read them.

    Returns:
        B entries: a token id, or the exception that row's choice raised.
    """
    out: list = [None] * len(choosers)
    plain = [i for i, c in enumerate(choosers) if c.plain]
    if plain:
        scores = logits[plain].float()  # a copy (indexed by a list): the caller's logits stay as they are
        nan = _nan_rows(scores).tolist()
        for j, i in enumerate(plain):
            for proc in choosers[i].procs:  # only _HoldEos
                if proc.holds(generated[i]):
                    scores[j, proc.eos] = -float("inf")
        for i, token, bad in zip(plain, argmax_rows(scores).tolist(), nan):
            out[i] = _not_numbers() if bad else token
    for i, chooser in enumerate(choosers):
        if chooser.plain:
            continue
        try:
            out[i] = int(chooser(seq(i), logits[i : i + 1])[0])
        except Exception as e:  # noqa: BLE001 - this row's failure, returned for its caller to report
            out[i] = e
    return out


ARGMAX_CHUNK = 1024  # vocabulary positions per chunk in :func:`argmax_rows`


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(dim=-1)`` of (B, V) scores — the same indices, the first maximum of each row — from a max
    over chunks of the vocabulary, then an argmax within each row's first chunk holding its maximum. On CPU,
    PyTorch's argmax over 64 rows of the default vocabulary takes 3.0 ms against 0.3 ms for a max (2% of a
    64-row decoding step); other devices, and vocabularies that do not split into chunks, take argmax as is."""
    rows, vocab = scores.shape
    if scores.device.type != "cpu" or vocab % ARGMAX_CHUNK or vocab == ARGMAX_CHUNK:
        return scores.argmax(dim=-1)
    chunks = scores.reshape(rows, vocab // ARGMAX_CHUNK, ARGMAX_CHUNK)
    first = chunks.amax(dim=-1).argmax(dim=-1)  # (B,) the first chunk holding each row's maximum
    within = chunks[torch.arange(rows, device=scores.device), first].argmax(dim=-1)
    return first * ARGMAX_CHUNK + within


def _not_numbers() -> PrefixTuneError:
    return PrefixTuneError("the model's scores are not numbers (NaN): is the prefix finite?")


def _nan_rows(scores: torch.Tensor) -> torch.Tensor:
    """(B,) True where a row of ``scores`` (B, V) holds a NaN: its maximum is NaN exactly then (one reduction,
    no (B, V) mask: a tenth of the time of ``isnan(scores).any(dim=1)`` on 64 rows of the default vocabulary)."""
    return torch.isnan(scores.amax(dim=-1))


def _numbers(logits: torch.Tensor) -> torch.Tensor:
    """The model's scores, refused when any is NaN (a diverged prefix): no token can be chosen from them."""
    if _nan_rows(logits).any():
        raise _not_numbers()
    return logits


@dataclass
class TokenLogprob:
    """A token's log-probability under the model, and the most likely tokens at its position.

    ``logprob`` is None for a prompt's first token (nothing before it is a token to predict it from).
    """

    token: int
    logprob: float | None
    top: list[tuple[int, float]]  # (token, log-probability), most likely first


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Log-probabilities of ``tokens`` (N,) under ``logits`` (N, V), each with the ``top`` most likely tokens.

    They are the model's own distribution, before temperature, top-k/top-p and penalties (what the model
    says, as vLLM reports by default), so they do not depend on how the token was chosen. The one
    computation of token log-probabilities: the server's tokens as they are chosen and
    :func:`sequence_logprobs` both use it.
    """
    logp = torch.log_softmax(_numbers(logits).float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None].to(logp.device))[:, 0].tolist()
    if top > 0:
        values, ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(tokens.tolist(), chosen, tops)]


def sequence_logprobs(model, context: list[int], tokens: list[int], prefix: str, top: int = 0) -> list[TokenLogprob]:
    """Each of ``tokens`` scored after the prefix, ``context`` and the tokens before it, in one forward pass.

    Decoder-only: ``context`` then ``tokens`` form one sequence (``context`` must not be empty). Encoder-decoder:
    ``context`` is the encoder's input and ``tokens`` follow the decoder's start token.
    """
    if not tokens:
        return []
    device = model.device
    with torch.no_grad():
        if model.geometry.is_encoder_decoder:
            source = torch.tensor([context], device=device)
            decoder = torch.tensor([[decoder_start(model.base), *tokens[:-1]]], device=device)
            out = model(source, torch.ones_like(source), prefix=[prefix], decoder_input_ids=decoder)
            logits = out.logits[0]
        else:
            if not context:
                raise PrefixTuneError("sequence_logprobs: a decoder-only model needs at least one context token")
            ids = torch.tensor([context + tokens[:-1]], device=device)
            logits = model(ids, torch.ones_like(ids), prefix=[prefix]).logits[0, len(context) - 1 :]
    return logprobs_of(logits, torch.tensor(tokens), top)


def eos_and_pad(opts: GenerationOptions, config) -> tuple[list[int], int]:
    """The end-of-sequence ids and the pad id: the options', else the model config's."""
    eos = opts.eos_token_id if opts.eos_token_id is not None else getattr(config, "eos_token_id", None)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = opts.pad_token_id if opts.pad_token_id is not None else getattr(config, "pad_token_id", None)
    return eos, (pad if pad is not None else (eos[0] if eos else 0))


def seeded(seed: int | None, device, default: int = 0) -> torch.Generator:
    """A generator seeded with ``seed`` (``default`` when None)."""
    return torch.Generator(device=device).manual_seed(seed if seed is not None else default)


def generate(
    model,
    input_ids,
    attention_mask=None,
    prefix=None,
    generator: torch.Generator | None = None,
    options: GenerationOptions | None = None,
    **kwargs,
) -> torch.Tensor:
    """Generate with each row's prefix; returns ids as Hugging Face ``generate`` does.

    Args:
        model: A :class:`prefixtune.PrefixTunedModel`.
        input_ids: (B, T) inputs, left-padded for decoder-only models.
        attention_mask: (B, T); default all ones.
        prefix: A prefix name, one per row, or None for the active prefix.
        generator: Random generator for sampling (default: one seeded with ``options.seed``, else 0).
        options: A :class:`GenerationOptions`; ``kwargs`` override its fields.
        **kwargs: Fields of :class:`GenerationOptions`. ``stop`` works on text and is applied by the
            text-level callers (:func:`prefixtune.decode.decode_texts`, the server).

    Returns:
        Decoder-only: (B, T + N) inputs then new tokens. Encoder-decoder: (B, 1 + N) decoder start
        then new tokens. Rows that end early are filled with the pad id.
    """
    opts = options.replace(**kwargs) if options is not None else GenerationOptions.from_kwargs(**kwargs)
    config = model.base.config
    eos, pad = eos_and_pad(opts, config)
    if generator is None and opts.do_sample:
        generator = seeded(opts.seed, model.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            state, logits = PrefixedState.prefill(model, input_ids, attention_mask, prefix)
            if model.geometry.is_encoder_decoder:
                prompt = torch.full((len(input_ids), 1), decoder_start(model.base), device=input_ids.device)
            else:
                prompt = input_ids
            if opts.num_beams > 1:
                return _beam_search(model, state, logits, prompt, opts, eos, pad)
            return _sample(model, state, logits, prompt, opts, eos, pad, generator)
    finally:
        model.train(was_training)


def _sample(model, state, logits, prompt, opts, eos, pad, generator) -> torch.Tensor:
    """Greedy decoding or sampling, as Hugging Face ``_sample``; finished rows leave the batch."""
    choose = TokenChooser(opts, prompt.shape[1], eos, generator)
    eos_t = torch.tensor(eos, device=prompt.device)
    out = torch.full((len(prompt), prompt.shape[1] + opts.max_new_tokens), pad, dtype=torch.long, device=prompt.device)
    out[:, : prompt.shape[1]] = prompt
    width = prompt.shape[1]
    alive = torch.arange(len(prompt), device=prompt.device)  # batch rows still decoding
    seqs = prompt
    for i in range(opts.max_new_tokens):
        tokens = choose(seqs, logits)  # (B',)
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
            state.trim()
        logits = state.extend(tokens)
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
        log_probs = procs(flat_seqs, torch.log_softmax(_numbers(logits).float(), dim=-1))  # (B*K, V)
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
            state.trim()
        logits = state.extend(running[:, :, cur - 1].reshape(-1))
    out_seqs[alive], out_len[alive] = finished_seqs[:, 0], finished_len[:, 0]
    return out_seqs[:, : prompt_len + int(out_len.max())]
