"""Continuous batching over one frozen model with many prefixes (Li & Liang 2021, §8).

Requests that arrive together — and requests that arrive while others are decoding — share one
forward pass per decoding step, whatever their prefixes: new requests are prefilled and join the
running batch between steps; finished ones leave. The engine works on token ids only; text,
HTTP and streaming live in :mod:`prefixtune.serving.app`.

Greedy and sampled requests are batched continuously, on decoder-only and encoder-decoder models
alike (an encoder-decoder request is encoded and takes its first decoder step when it joins; T5's
relative positions and the BART family's per-row positions let prefixes and histories of any
length share the batch). Beam search requests — and every request on an encoder-decoder model
whose decoder positions cannot be set per row — are decoded as one static mixed-prefix batch per
admission round and set of options. Each step prefills at most ``prefill_budget`` prompt tokens:
joiners are admitted while their prompts fit, and a longer prompt is prefilled in chunks between
decoding steps, so one long prompt cannot stall the running requests. Every request carries one
:class:`prefixtune.GenerationOptions`, and its tokens are chosen by the same
:class:`prefixtune.generation.TokenChooser` (or beam search) that offline ``generate`` uses.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from .. import generation
from ..features import left_pad
from ..state import PrefixedState, decoder_start
from .registry import PrefixNotFound
from .requests import EngineStats, Request, done, emit, fail, finish_reason


class Engine:
    """A background thread that decodes all submitted requests together.

    Args:
        model: A :class:`prefixtune.PrefixTunedModel` holding the prefixes requests name.
        eos_token_ids: Token ids that end a request.
        pad_token_id: Padding id for prompts.
        max_batch_size: Most requests decoded at once.
        lock: Held during every model call; take it to add or remove prefixes safely.
        prefill_budget: Most prompt tokens prefilled per step, between decoding steps of the running
            requests: joiners are admitted while their prompts fit, and a longer prompt is prefilled in
            chunks (an eighth of the budget while others decode), so no prompt stalls the others.
    """

    def __init__(
        self,
        model,
        eos_token_ids: list[int],
        pad_token_id: int,
        max_batch_size: int = 32,
        lock: threading.Lock | None = None,
        prefill_budget: int = 256,
    ) -> None:
        self.model = model
        self.eos = set(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.lock = lock or threading.Lock()
        self.stats = EngineStats()
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._state: PrefixedState | None = None
        self._pending: torch.Tensor | None = None  # (B,) each running row's token not yet fed
        self._admitting: list[Request] = []
        self.prefill_budget = prefill_budget
        self._chunked: list[tuple[Request, PrefixedState, int]] = []  # long prompts: (request, state, tokens fed)
        self._wake = threading.Condition()
        self._ids = itertools.count(1)
        self._stop = False
        self._thread: threading.Thread | None = None
        # Rows join a running batch by merging states; recurrent layers' states (hybrid models) do not merge.
        self.continuous = model.mixes_prefix_lengths and not model.layout.recurrent

    # ------------------------------------------------------------------ public
    def submit(self, request: Request) -> Request:
        """Queue a request; callbacks report its tokens and end."""
        if not self.model.has_prefix(request.prefix):
            raise PrefixNotFound(f"unknown prefix {request.prefix!r}")
        request.id = next(self._ids)
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()
        return request

    @property
    def busy(self) -> int:
        """Requests waiting, being admitted or running."""
        with self._wake:
            return len(self._waiting) + len(self._admitting) + len(self._running) + len(self._chunked)

    def start(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="prefixtune-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop the thread; with ``drain``, first finish every request already submitted."""
        deadline = time.monotonic() + timeout
        while drain and self.busy and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=max(deadline - time.monotonic(), 1.0))

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self._running and not self._chunked:
                    self._wake.wait()
                if self._stop:
                    return
            try:
                with self.lock, torch.inference_mode():
                    self.step()
            except Exception as e:  # noqa: BLE001 - a failing decoding step must not kill the server
                self._fail_all(e)

    def step(self) -> None:
        """One round: admit waiting requests (and prefill the next chunk of long prompts) within the step's
        token budget, then decode one token for every running request."""
        budget = self._admit()
        self._advance_chunks(budget)
        if self._running:
            self._decode_step()

    def _take_waiting(self, limit: int) -> list[Request]:
        """Up to ``limit`` waiting requests, in order, whose prompts fit the step's token budget (a prompt
        longer than the whole budget is taken alone, to be prefilled in chunks)."""
        taken, tokens = [], 0
        with self._wake:  # moved to _admitting under the lock, so `busy` never misses them
            while self._waiting and len(taken) < limit:
                size = len(self._waiting[0].input_ids)
                if taken and tokens + size > self.prefill_budget:
                    break
                taken.append(self._waiting.popleft())
                tokens += size
            self._admitting = taken
        now = time.monotonic()
        for r in taken:
            r.started = now
            self.stats.queue_times.append(now - r.arrived)
            if not r.cancelled and not self.model.has_prefix(r.prefix):  # removed while the request waited
                fail(r, 404, f"prefix {r.prefix!r} was removed before the request started")
                done(r, "error")
        return [r for r in taken if r.error is None and not self._finish_if_cancelled(r)]

    def _admit(self) -> int:
        """Start waiting requests; returns the prefill budget left for this step."""
        room = self.max_batch_size - len(self._running) - len(self._chunked)
        if room <= 0:
            return self.prefill_budget
        new = self._take_waiting(room)  # held in _admitting: reported as failed if a prefill raises
        for r in new:
            if r.prompt_logprobs is not None:
                _isolated([r], self._score_prompt)
            if r.score_only and r.error is None:
                done(r, "length")
        new = [r for r in new if r.error is None and not r.score_only]
        long = [r for r in new if self._chunkable(r) and len(r.input_ids) > self.prefill_budget]
        for r in long:
            _isolated([r], self._begin_chunks)
        new = [r for r in new if r not in long]
        static = [r for r in new if r.options.num_beams > 1 or not self.continuous]
        for group in _static_groups(static, self.model):
            self._admitting = group
            _isolated(group, self._run_static)
        joining = [r for r in new if r.options.num_beams == 1 and self.continuous]
        self._admitting = joining
        if joining:
            _isolated(joining, self._join)
        self._admitting = []
        return self.prefill_budget - sum(len(r.input_ids) for r in new)

    def _join(self, joining: list[Request]) -> None:
        """Prefill requests and merge them into the running batch."""
        ids, mask = self._prompts(joining)
        state, logits = PrefixedState.prefill(self.model, ids, mask, [r.prefix for r in joining])
        self._run_with(joining, state, logits)

    def _run_with(self, joining: list[Request], state: PrefixedState, logits: torch.Tensor) -> None:
        """Requests whose prompts are prefilled: choose their first tokens and merge them into the running batch."""
        for r in joining:
            self._start_choosing(r)
        self.stats.batch_sizes.append(len(joining))
        tokens = self._choose(joining, logits)
        self._state = state if self._state is None else PrefixedState.merge([self._state, state])
        self._running.extend(joining)
        self._pending = tokens if self._pending is None else torch.cat([self._pending, tokens])
        self._retire()

    def _score_prompt(self, requests: list[Request]) -> None:
        """The prompt's own log-probabilities (OpenAI's ``echo`` with ``logprobs``)."""
        (request,) = requests
        ids = request.input_ids
        scores = generation.sequence_logprobs(self.model, ids[:1], ids[1:], request.prefix, request.prompt_logprobs)
        request.prompt_scores = [generation.TokenLogprob(ids[0], None, []), *scores]

    # ------------------------------------------------------------------ long prompts, chunk by chunk
    def _chunkable(self, request: Request) -> bool:
        return self.continuous and request.options.num_beams == 1 and not self.model.geometry.is_encoder_decoder

    def _begin_chunks(self, requests: list[Request]) -> None:
        (request,) = requests
        self._chunked.append((request, PrefixedState.begin(self.model, [request.prefix], 1), 0))

    def _advance_chunks(self, budget: int) -> None:
        """Prefill the next chunk of each long prompt, oldest first, within ``budget`` tokens. While other
        requests decode, long prompts get an eighth of the budget per step (at least 16 tokens), so a step
        takes at most about twice as long as decoding alone; when nothing decodes, the whole budget."""
        share = self.prefill_budget if not self._running else max(16, self.prefill_budget // 8)
        budget = min(max(budget, share // 2), share)  # always some progress, never more than the share
        going = []
        for request, state, fed in self._chunked:
            if request.cancelled:
                done(request, "cancelled")
                continue
            size = min(len(request.input_ids) - fed, budget)
            if size <= 0:
                going.append((request, state, fed))
                continue
            budget -= size
            ids = torch.tensor([request.input_ids[fed : fed + size]], device=self.model.device)  # (1, size)
            try:
                logits = state.feed(ids, torch.ones_like(ids))
            except Exception as e:  # noqa: BLE001 - this request's own failure
                fail(request, 500, f"decoding failed: {type(e).__name__}: {e}")
                done(request, "error")
                continue
            if fed + size < len(request.input_ids):
                going.append((request, state, fed + size))
            else:
                self._run_with([request], state, logits)
        self._chunked = going

    def _decode_step(self) -> None:
        self.stats.batch_sizes.append(len(self._running))
        self.stats.steps += 1
        logits = self._state.extend(self._pending)
        self._pending = self._choose(self._running, logits)
        self._retire()

    def _start_choosing(self, request: Request) -> None:
        """The request's token chooser, with its own generator (seeded with its seed, else its id)."""
        device = self.model.device
        generator = generation.seeded(request.options.seed, device, default=request.id)
        if self.model.geometry.is_encoder_decoder:  # processors read the decoder's tokens
            request.context = [decoder_start(self.model.base)]
        else:
            request.context = request.input_ids
        request.chooser = generation.TokenChooser(request.options, len(request.context), sorted(self.eos), generator)

    def _choose(self, requests: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """Pick each row's next token with its own options (greedy rows together, in one argmax); record and
        report it. A row that fails (scores that are not finite, a processor error) ends its own request;
        it leaves at ``_retire``."""
        device = self.model.device
        picks = generation.choose_rows(
            [r.chooser for r in requests],
            [len(r.tokens) for r in requests],
            logits,
            lambda i: torch.tensor([requests[i].context + requests[i].tokens], device=device),
        )
        chosen = []
        for i, (request, token) in enumerate(zip(requests, picks)):
            if isinstance(token, Exception):  # this request's failure, not the batch's
                fail(request, 500, f"decoding failed: {type(token).__name__}: {token}")
                chosen.append(self.pad_token_id)
                continue
            if request.logprobs is not None:
                row, top = logits[i : i + 1], request.logprobs
                request.token_logprobs += generation.logprobs_of(row, torch.tensor([token]), top)
            request.tokens.append(token)
            self.stats.generated_tokens += 1
            emit(request, request.on_token, token)
            chosen.append(token)
        return torch.tensor(chosen, device=logits.device)

    def _retire(self) -> None:
        keep = []
        for i, request in enumerate(self._running):
            reason = finish_reason(request, self.eos)
            if reason is None:
                keep.append(i)
            else:
                done(request, reason)
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._state, self._pending = None, None
            return
        index = torch.tensor(keep, device=self._pending.device)
        self._state.select(index)
        self._pending = self._pending[index]
        self._state.trim()

    def _run_static(self, group: list[Request]) -> None:
        """Beam search (or encoder-decoder) requests: one mixed-prefix batch through ``generate``."""
        self.stats.batch_sizes.append(len(group))
        first = group[0].options
        ids, mask = self._prompts(group)
        generator = generation.seeded(first.seed, self.model.device, default=group[0].id) if first.do_sample else None
        out = self.model.generate(
            ids,
            mask,
            prefix=[r.prefix for r in group],
            generator=generator,
            options=first.replace(eos_token_id=sorted(self.eos), pad_token_id=self.pad_token_id, stop=None),
        )
        skip = 1 if self.model.geometry.is_encoder_decoder else ids.shape[1]
        for request, row in zip(group, out[:, skip:].tolist()):
            tokens = []
            for token in row[: request.options.max_new_tokens]:
                tokens.append(token)
                if token in self.eos or (request.should_stop is not None and request.should_stop(tokens)):
                    break
            if request.logprobs is not None:  # beam search: scored along the answer it chose
                request.token_logprobs = generation.sequence_logprobs(
                    self.model, request.input_ids, tokens, request.prefix, request.logprobs
                )
            for token in tokens:
                request.tokens.append(token)
                self.stats.generated_tokens += 1
                emit(request, request.on_token, token)
            done(request, finish_reason(request, self.eos) or "eos")

    def _prompts(self, requests: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = left_pad([r.input_ids for r in requests], self.pad_token_id)
        return ids.to(self.model.device), mask.to(self.model.device)

    def _finish_if_cancelled(self, request: Request) -> bool:
        if request.cancelled:
            done(request, "cancelled")
        return request.cancelled

    def _fail_all(self, error: Exception) -> None:
        """After a decoding step raised: end the requests being decoded (the waiting ones get their turn)."""
        for request in self._running + self._admitting + [c[0] for c in self._chunked]:
            fail(request, 500, f"decoding failed: {type(error).__name__}: {error}")
            done(request, "error")
        self._running, self._admitting, self._state, self._pending, self._chunked = [], [], None, None, []


def _isolated(requests: list[Request], run: Callable[[list[Request]], None]) -> None:
    """``run`` the requests together; if that raises, run each alone, so that only the requests that fail
    by themselves end with an error."""
    try:
        run(requests)
        return
    except Exception as e:  # noqa: BLE001 - find which request it was
        error = e
    for request in requests:
        if request.tokens or request.error is not None:  # finished before the failure
            continue
        try:
            if len(requests) == 1:
                raise error
            run([request])
        except Exception as e:  # noqa: BLE001 - this request's own failure
            fail(request, 500, f"decoding failed: {type(e).__name__}: {e}")
            done(request, "error")


def _static_groups(requests: list[Request], model) -> list[list[Request]]:
    """Requests that can share one ``generate`` call: the same decoding options, and for
    encoder-decoder models with absolute positions, the same prefix length. A sampled request is
    decoded alone, with its own generator, so its answer does not depend on its batch-mates."""
    groups: dict[tuple, list[Request]] = {}
    for r in requests:
        alone = r.id if r.options.do_sample else None
        length = None if model.mixes_prefix_lengths else model.get_prefix(r.prefix).num_tokens
        key = (r.options.decoding_key(), length, alone)
        groups.setdefault(key, []).append(r)
    return list(groups.values())
