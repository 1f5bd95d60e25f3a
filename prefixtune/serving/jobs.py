"""What every generation route shares: the prefix held while a request uses it, prompts checked and turned
into engine requests, and the engine's answers awaited whole or streamed as server-sent events.

The native routes (:mod:`prefixtune.serving.app`) and the OpenAI routes (:mod:`prefixtune.serving.openai_api`)
differ only in the shapes of their bodies and answers; everything between HTTP and the engine is here, once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..errors import PrefixTuneError
from ..generation import TokenLogprob
from ..options import GenerationOptions
from .engine import Engine
from .engine import Request as EngineRequest
from .http import ApiError, InFlight
from .registry import PrefixNotFound, PrefixRegistry
from .settings import ServerSettings
from .text import TextStream, prompt_ids, text_ids


@dataclass
class Job:
    """One answer being made: the engine's request, its text, and where it goes in the reply.

    Attributes:
        request: What the engine decodes.
        text: Turns its tokens into the answer's text (whole or in streamed pieces).
        index: The answer's place among the reply's choices.
        prompt: The prompt's text, when the answer repeats it first (OpenAI's ``echo``).
        reported: How many of its token log-probabilities were already streamed.
        ends: End-of-sequence ids: an answer's final one has no text, so no log-probability is reported for it.
    """

    request: EngineRequest
    text: TextStream
    index: int
    prompt: str | None = None
    reported: int = 0
    ends: frozenset[int] = frozenset()

    def logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities of the answer's tokens so far, an ending end-of-sequence token's left out."""
        tokens = list(self.request.tokens)  # read first: the engine records a token's score before the token
        scores = self.request.token_logprobs[: len(tokens)]
        return scores[:-1] if tokens and tokens[-1] in self.ends and len(scores) == len(tokens) else scores

    def new_logprobs(self) -> list[TokenLogprob]:
        """Token log-probabilities not streamed yet (all of them the first time)."""
        scores = self.logprobs()
        fresh, self.reported = scores[self.reported :], max(self.reported, len(scores))
        return fresh


# shape(job, text, finish reason or None, token log-probabilities new in this piece) -> an event
Shape = Callable[[Job, str, "str | None", list[TokenLogprob]], dict]
Fail = Callable[[Job, int, str], dict]  # (job, HTTP status, message) -> an error event


class Jobs:
    """Requests' way to the engine and back, with the server's limits applied on the way."""

    def __init__(
        self,
        model,
        tokenizer,
        engine: Engine,
        registry: PrefixRegistry,
        settings: ServerSettings,
        in_flight: InFlight,
    ) -> None:
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.registry, self.settings, self.in_flight = registry, settings, in_flight

    @asynccontextmanager
    async def using(self, request: Request, name: str, field: str):
        """Prefix ``name`` resident (loaded on first use) and kept so while the request runs; a stream takes
        over releasing it (``use["stream"] = True``) when its last event is sent."""
        if not request.state.tenant.may_use(name):
            raise ApiError(404, f"unknown prefix {name!r}", field)
        key = self.in_flight.enter(request.state.key)  # 429 before anything is loaded
        try:
            await asyncio.to_thread(self.registry.acquire, name)
        except PrefixNotFound:
            self.in_flight.leave(key)
            raise ApiError(404, f"unknown prefix {name!r}", field) from None
        except BaseException:
            self.in_flight.leave(key)
            raise
        use = {"stream": False, "key": key, "prefix": name}
        try:
            yield use
        finally:
            if not use["stream"]:
                self.registry.release(name)
                self.in_flight.leave(key)

    # ------------------------------------------------------------------ checks
    def options(self, values: dict) -> GenerationOptions:
        try:
            return GenerationOptions.from_kwargs(**values)
        except PrefixTuneError as e:
            raise ApiError(422, str(e), str(e).split(" ", 1)[0]) from None

    def inputs(self, texts, field: str, max_new: int, copies: int = 1) -> list:
        """One input or a list, within the batch limit (counting ``copies`` answers per input) and with at
        most the server's new tokens."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ApiError(422, "needs at least one input", field)
        if len(texts) * copies > self.settings.max_batch_size:
            raise ApiError(
                400,
                f"{len(texts)} inputs × {copies} answers exceed the batch limit of {self.settings.max_batch_size}",
                field,
            )
        if max_new > self.settings.max_new_tokens:
            raise ApiError(400, f"at most {self.settings.max_new_tokens} new tokens", "max_new_tokens")
        return texts

    def prompt(self, prefix: str, text: str, field: str, as_is: bool = False) -> list[int]:
        """The prompt ids of ``text``, as offline ``generate`` makes them (``as_is``: its own tokens only, to
        score it); 400 when it cannot be encoded."""
        encode = text_ids if as_is else prompt_ids
        return self.encoded(lambda: encode(self.model, self.tokenizer, prefix, text), text, field)

    def encoded(self, encode: Callable[[], list[int]], text: str, field: str) -> list[int]:
        """``encode()``'s ids, every way a text can fail to become a prompt answered with a 400."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"text that cannot be encoded as UTF-8 ({e.reason} at {e.start})", field) from None
        try:
            ids = encode()
        except PrefixTuneError as e:
            raise ApiError(400, str(e), field) from None
        except Exception as e:  # noqa: BLE001 - the tokenizer (or its chat template) refused this text
            raise ApiError(400, f"the tokenizer cannot encode this text ({type(e).__name__}: {e})", field) from None
        if len(ids) > self.settings.max_input_tokens:
            raise ApiError(
                400, f"input of {len(ids)} tokens exceeds the limit of {self.settings.max_input_tokens}", field
            )
        return ids

    def job(self, prefix: str, ids: list[int], opts: GenerationOptions, index: int, **extra) -> Job:
        """A job for prompt ``ids``; ``extra`` sets the engine request's other fields (logprobs, ...)."""
        stream = TextStream(self.tokenizer, opts.stop)
        request = EngineRequest(prefix, ids, opts, should_stop=stream.should_stop, **extra)
        return Job(request, stream, index, ends=frozenset(self.engine.eos))

    # ------------------------------------------------------------------ answers
    async def run(self, jobs: list[Job]) -> list[tuple[str, str]]:
        """Every job's (text, finish reason); the first failure is raised as its own status."""
        loop = asyncio.get_running_loop()
        futures = []
        for job in jobs:
            future = loop.create_future()
            job.request.on_done = lambda reason, tokens, f=future: loop.call_soon_threadsafe(_resolve, f, reason)
            futures.append(future)
            self.engine.submit(job.request)
        try:
            reasons = await asyncio.wait_for(asyncio.gather(*futures), self.settings.request_timeout)
        except asyncio.TimeoutError:
            for job in jobs:
                job.request.cancelled = True
            raise ApiError(504, f"request timed out after {self.settings.request_timeout:.0f} s") from None
        failed = next((job.request.error for job, r in zip(jobs, reasons) if r == "error"), None)
        if failed:
            raise ApiError(*failed)
        return [(job.text.final(job.request.tokens), reason) for job, reason in zip(jobs, reasons)]

    async def _events(self, jobs: list[Job], shape: Shape, fail: Fail) -> AsyncIterator[dict]:
        """Every job's events: ``shape`` for pieces of text and finishes, ``fail`` for a job that failed (an
        error event, never a normal finish)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        for i, job in enumerate(jobs):
            job.request.on_token = lambda token, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, "token", None))
            job.request.on_done = lambda reason, tokens, i=i: loop.call_soon_threadsafe(
                queue.put_nowait, (i, "done", reason)
            )
            self.engine.submit(job.request)
        open_jobs, deadline = len(jobs), loop.time() + self.settings.request_timeout
        try:
            while open_jobs:
                try:
                    i, kind, reason = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0.001))
                except asyncio.TimeoutError:
                    yield {"error": {"message": f"request timed out after {self.settings.request_timeout:.0f} s"}}
                    return
                job = jobs[i]
                tokens = job.request.tokens
                if kind == "token":
                    delta = job.text.delta(tokens)
                    if delta:
                        yield shape(job, delta, None, job.new_logprobs())
                elif reason == "error":
                    open_jobs -= 1
                    yield fail(job, *job.request.error)
                else:
                    open_jobs -= 1
                    yield shape(job, job.text.rest(tokens), reason, job.new_logprobs())
        finally:
            if open_jobs:  # timed out or the client went away: free the batch slots
                for job in jobs:
                    job.request.cancelled = True

    def sse(
        self,
        jobs: list[Job],
        shape: Shape,
        fail: Fail,
        use: dict,
        first: list[dict] = (),
        last: Callable[[], list[dict]] | None = None,
    ) -> StreamingResponse:
        """The jobs' events as a server-sent event stream: ``first`` events, then the jobs' (see
        :meth:`_events`), then ``last()``'s, then ``[DONE]``."""
        events = self._events(jobs, shape, fail)
        use["stream"] = True  # the stream releases the prefix and the key's slot when it ends

        async def body():
            try:
                for event in first:
                    yield _event(event)
                failed = False
                async for event in events:
                    failed = failed or "error" in event
                    yield _event(event)
                if last is not None and not failed:
                    for event in last():
                        yield _event(event)
                yield "data: [DONE]\n\n"
            finally:
                self.in_flight.leave(use["key"])
                self.registry.release(use["prefix"])

        return StreamingResponse(body(), media_type="text/event-stream")


def _event(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


def _resolve(future: asyncio.Future, reason: str) -> None:
    if not future.done():
        future.set_result(reason)
