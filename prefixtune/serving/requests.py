"""One generation request on token ids, as the engine carries it: its options, callbacks, tokens and end.

A request's failure is its own (:func:`fail`), its callbacks may raise without harming the engine
(:func:`emit`), and it ends exactly once with a reason (:func:`done`, :func:`finish_reason`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import generation
from ..options import GenerationOptions


@dataclass
class Request:
    """One generation request on token ids.

    Attributes:
        prefix: Name of the prefix to use.
        input_ids: The prompt (already formatted for the model).
        options: How to decode (``stop`` is applied by ``should_stop``, which works on text).
        on_token: Called from the engine thread with each new token id.
        on_done: Called once with the finish reason (``eos``, ``length``, ``stop``, ``cancelled``,
            ``error``) and all generated ids.
        should_stop: Polled after each token; True ends the request with reason ``stop``.
        error: Why the request failed, as (HTTP status, message), when its reason is ``error``. A
            failure ends its own request only: the other rows of the batch go on as if alone.
        logprobs: Record each new token's log-probability (in ``token_logprobs``, before ``on_token``
            is called) with this many most likely alternatives; None records nothing.
        prompt_logprobs: Score the prompt's tokens first (``prompt_scores``; decoder-only), with this
            many alternatives each; None does not.
        score_only: Only score the prompt, generate nothing (ends with reason ``length``).
    """

    prefix: str
    input_ids: list[int]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    on_token: Callable[[int], None] | None = None
    on_done: Callable[[str, list[int]], None] | None = None
    should_stop: Callable[[list[int]], bool] | None = None
    id: int = 0
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    error: tuple[int, str] | None = None
    chooser: generation.TokenChooser | None = None
    context: list[int] = field(default_factory=list)  # what token processors read before the new tokens
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    score_only: bool = False
    token_logprobs: list[generation.TokenLogprob] = field(default_factory=list)
    prompt_scores: list[generation.TokenLogprob] = field(default_factory=list)


@dataclass
class EngineStats:
    """Counters the server exports as metrics."""

    steps: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    queue_times: list[float] = field(default_factory=list)
    generated_tokens: int = 0

    def drain(self) -> tuple[list[int], list[float]]:
        sizes, waits = self.batch_sizes, self.queue_times
        self.batch_sizes, self.queue_times = [], []
        return sizes, waits


def fail(request: Request, status: int, message: str) -> None:
    if request.error is None:
        request.error = (status, message)


def emit(request: Request, callback, *args) -> None:
    """Call a request's callback; one that raises (its client went away) cancels that request only."""
    if callback is None:
        return
    try:
        callback(*args)
    except Exception:  # noqa: BLE001 - the client's side is gone
        request.cancelled = True


def finish_reason(request: Request, eos: set[int]) -> str | None:
    if request.error is not None:
        return "error"
    if request.cancelled:
        return "cancelled"
    if request.tokens and request.tokens[-1] in eos:
        return "eos"
    if request.should_stop is not None and request.should_stop(request.tokens):
        return "stop"
    if len(request.tokens) >= request.options.max_new_tokens:
        return "length"
    return None


def done(request: Request, reason: str) -> None:
    emit(request, request.on_done, reason, list(request.tokens))
