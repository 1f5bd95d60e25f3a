"""OpenAI's API over the prefixes: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.

Each prefix is a model (``model`` = prefix name; its ``root`` is the base model). Completions take
``n``, ``logprobs`` (up to 20 alternatives), ``echo`` (with ``logprobs`` and ``max_tokens`` 0 it scores the
prompt's own tokens, as evaluation harnesses ask), ``best_of`` equal to ``n``, ``stream`` and ``stream_options``. Chat
completions put the conversation through the tokenizer's chat template (the prefix in front, as keys and
values) and take ``n``, ``logprobs``/``top_logprobs``, ``max_completion_tokens``, ``stream`` (chat chunks)
and ``stream_options``. Both take the server's other decoding options (``top_k``, ``num_beams``, ...).

Log-probabilities are the model's own distribution, before temperature, top-k/top-p and penalties (vLLM's
default). Temperature 0 is greedy decoding. With ``n`` > 1 and a ``seed``, answer j samples with seed + j.
A field this server does not implement, or one at a value that asks for something it does not do
(``presence_penalty`` ≠ 0, ``tools``, ...), is refused with a 400 naming it, never ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, Path, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, create_model

from .. import options
from ..generation import TokenLogprob
from ..options import MAX_SEED
from .http import PREFIX_NAME, ApiError, documented
from .jobs import Job, Jobs
from .text import chat_ids, token_bytes, token_text

MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's chat API allows
MAX_N = 64


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = Field(False, description="end the stream with a chunk holding the usage")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One turn of a conversation ("developer" is given to the chat template as "system")."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(max_length=256)]
    name: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def for_template(self) -> dict:
        turn = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        return turn | ({"name": self.name} if self.name else {})


# The server's decoding options OpenAI's bodies take (max_tokens, temperature and n are declared by each body;
# beam search and the rest are the server's own /v1/generate's).
_LEFT_OUT = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k")
_LEFT_OUT += ("num_beams", "length_penalty", "early_stopping")
_DECODING = options.pydantic_fields({name: None for name in _LEFT_OUT})


_TEMPERATURE = (
    StrictFloat,
    Field(1.0, ge=0, le=options.bounds("temperature")["le"], allow_inf_nan=False, description="0 = greedy"),
)
_MAX_NEW = options.bounds("max_new_tokens")["le"]
_COMMON = dict(
    stream=(StrictBool, False),
    stream_options=(StreamOptions | None, None),
    temperature=_TEMPERATURE,
    n=(options.integer(ge=1, le=MAX_N), Field(1, description="answers per prompt")),
)

CompletionBody = create_model(
    "CompletionBody",
    __config__=ConfigDict(extra="allow"),  # other OpenAI fields: accepted at their inert values, else refused (400)
    model=(str, Field(pattern=PREFIX_NAME, description="name of the prefix")),
    prompt=(str | Annotated[list[str], Field(min_length=1)], Field(description="one prompt, or a list")),
    max_tokens=(options.integer(ge=0, le=_MAX_NEW), Field(16, description="0 only with echo: score the prompt")),
    logprobs=(
        options.integer(nullable=True, ge=0, le=MAX_LOGPROBS),
        Field(None, description="log-probability of each token, with this many most likely alternatives"),
    ),
    echo=(StrictBool, Field(False, description="repeat the prompt before the answer (and score it, with logprobs)")),
    best_of=(options.integer(nullable=True, ge=1, le=MAX_N), Field(None, description="only equal to n")),
    **_COMMON,
    **_DECODING,
)

ChatBody = create_model(
    "ChatBody",
    __config__=ConfigDict(extra="allow"),
    model=(str, Field(pattern=PREFIX_NAME, description="name of the prefix")),
    messages=(Annotated[list[Message], Field(min_length=1, max_length=1024)], ...),
    max_tokens=(options.integer(nullable=True, ge=1, le=_MAX_NEW), None),
    max_completion_tokens=(
        options.integer(nullable=True, ge=1, le=_MAX_NEW),
        Field(None, description="most new tokens (default: until the turn ends, at most the server's limit)"),
    ),
    logprobs=(StrictBool, Field(False, description="log-probability of each token of the answer")),
    top_logprobs=(
        options.integer(nullable=True, ge=0, le=MAX_LOGPROBS),
        Field(None, description="most likely alternatives per token (needs logprobs)"),
    ),
    **_COMMON,
    **_DECODING,
)

# OpenAI fields at the values that ask for nothing ("user" and "metadata" are the client's own notes); any
# other value, or any other field, is refused with a 400 naming it.
_INERT = {"suffix": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0}
_CHAT_INERT = _INERT | {"tools": None, "tool_choice": None, "functions": None, "function_call": None}
_CHAT_INERT |= {"response_format": {"type": "text"}, "parallel_tool_calls": None, "store": False}
_NOTES = ("user", "metadata")


def _unimplemented(body, inert: dict) -> None:
    extra = body.model_extra or {}
    refused = sorted(k for k, v in extra.items() if k not in _NOTES and (k not in inert or v != inert[k]))
    if refused:
        raise ApiError(400, f"not implemented by this server: {', '.join(refused)}", refused[0])


def add_routes(app: FastAPI, jobs: Jobs) -> None:
    """Add OpenAI's routes to ``app``, served by ``jobs``."""
    model, tokenizer, registry = jobs.model, jobs.tokenizer, jobs.registry

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "prefixtune", "root": model.base_name}

    @app.get("/v1/models", responses=documented())
    async def list_models(request: Request):
        """OpenAI's model list: each prefix this key may use is a model, the base model its root."""
        names = [n for n in registry.names() if request.state.tenant.may_use(n)]
        return {"object": "list", "data": [card(n) for n in names]}

    @app.get("/v1/models/{name}", responses=documented(404))
    async def get_model(request: Request, name: Annotated[str, Path(pattern=PREFIX_NAME)]):
        if not request.state.tenant.may_use(name) or not registry.known(name):
            raise ApiError(404, f"unknown prefix {name!r}", "name")
        return card(name)

    def decoding(body, max_new: int):
        """The body's GenerationOptions (OpenAI's temperature 0 is greedy)."""
        given = body.model_dump(include=set(_DECODING))
        sampled = {"do_sample": True, "temperature": body.temperature} if body.temperature > 0 else {}
        return jobs.options({**given, **sampled, "max_new_tokens": max_new})

    def copies(body, opts, prefix: str, prompts: list[list[int]], **extra) -> list[Job]:
        """``body.n`` jobs per prompt; answer j of a seeded request samples with seed + j."""
        out = []
        for i, ids in enumerate(prompts):
            for j in range(body.n):
                seeded = opts if j == 0 or opts.seed is None else opts.replace(seed=(opts.seed + j) % (MAX_SEED + 1))
                out.append(jobs.job(prefix, ids, seeded, i * body.n + j, **extra))
        return out

    def usage(prompts: list[list[int]], answers: list[Job]) -> dict:
        prompt_tokens = sum(len(ids) for ids in prompts)
        completion_tokens = sum(len(job.request.tokens) for job in answers)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def head(kind: str, prefix: str) -> dict:
        ident = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        return {"id": ident, "object": kind, "created": int(time.time()), "model": prefix}

    def streamed(body, top: dict, answers: list[Job], prompts, shape, use, first=()):
        last = None
        if body.stream_options is not None and body.stream_options.include_usage:

            def last():
                return [{**top, "choices": [], "usage": usage(prompts, answers)}]

        def fail(job: Job, status: int, message: str) -> dict:
            kind = "server_error" if status >= 500 else "invalid_request_error"
            return {"error": {"message": message, "type": kind, "param": None, "code": status, "index": job.index}}

        return jobs.sse(answers, shape, fail, use, first=first, last=last)

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions", responses=documented(400, 404, 413, 429, 504))
    async def completions(request: Request, body: CompletionBody):
        _unimplemented(body, _INERT)
        if body.best_of not in (None, 1, body.n):
            raise ApiError(400, "best_of other than n is not implemented by this server", "best_of")
        if body.max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens 0 asks for nothing: it is only allowed with echo", "max_tokens")
        scored = body.echo and body.logprobs is not None
        if scored and model.geometry.is_encoder_decoder:
            raise ApiError(400, "echo with logprobs needs a decoder-only model: an encoder reads its prompt", "echo")
        texts = jobs.inputs(body.prompt, "prompt", body.max_tokens, body.n)
        opts = decoding(body, max(body.max_tokens, 1))
        top = head("text_completion", body.model)
        async with jobs.using(request, body.model, "model") as use:
            # Scoring only: the text's own tokens; else the prompt as the prefix was trained to continue it
            # (ending with the separator, whose text is empty).
            prompts = [jobs.prompt(body.model, text, "prompt", as_is=body.max_tokens == 0) for text in texts]
            if not all(prompts):
                raise ApiError(400, "an empty prompt has no tokens to score", "prompt")
            answers = copies(
                body,
                opts,
                body.model,
                prompts,
                logprobs=body.logprobs,
                prompt_logprobs=body.logprobs if scored else None,
                score_only=body.max_tokens == 0,
            )
            for job in answers:
                job.prompt = texts[job.index // body.n] if body.echo else None
            if body.stream:

                def shape(job: Job, text: str, reason: str | None, fresh: list[TokenLogprob]) -> dict:
                    return {**top, "choices": [choice(job, text, reason, fresh)]}

                return streamed(body, top, answers, prompts, shape, use)
            results = await jobs.run(answers)
        return {
            **top,
            "choices": [choice(job, text, reason, job.logprobs()) for job, (text, reason) in zip(answers, results)],
            "usage": usage(prompts, answers),
        }

    def choice(job: Job, text: str, reason: str | None, fresh: list[TokenLogprob]) -> dict:
        """A completion choice; the first piece of an echoed answer carries the prompt (and its scores)."""
        scores = fresh
        if job.prompt is not None:
            text, scores = job.prompt + text, job.request.prompt_scores + scores
            job.prompt = None  # echoed once
        logprobs = None
        if job.request.logprobs is not None:
            logprobs = _completion_logprobs(tokenizer, scores)
        return {"text": text, "index": job.index, "logprobs": logprobs, "finish_reason": _reason(reason)}

    # ------------------------------------------------------------------ chat
    @app.post("/v1/chat/completions", responses=documented(400, 404, 413, 429, 504))
    async def chat_completions(request: Request, body: ChatBody):
        _unimplemented(body, _CHAT_INERT)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        max_new = body.max_completion_tokens or body.max_tokens or jobs.settings.max_new_tokens
        jobs.inputs(["conversation"], "messages", max_new, body.n)
        opts = decoding(body, max_new)
        messages = [m.for_template() for m in body.messages]
        words = "".join(m["content"] for m in messages)
        top = head("chat.completion.chunk" if body.stream else "chat.completion", body.model)
        async with jobs.using(request, body.model, "model") as use:
            ids = jobs.encoded(lambda: chat_ids(model, tokenizer, body.model, messages), words, "messages")
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            answers = copies(body, opts, body.model, [ids], logprobs=logprobs)
            if body.stream:
                opening = [
                    {**top, "choices": [_chunk(job.index, {"role": "assistant", "content": ""}, None, None)]}
                    for job in answers
                ]

                def shape(job: Job, text: str, reason: str | None, fresh: list[TokenLogprob]) -> dict:
                    scores = chat_logprobs(job, fresh)
                    delta = {"content": text} if text or reason is None else {}
                    return {**top, "choices": [_chunk(job.index, delta, scores, _reason(reason))]}

                return streamed(body, top, answers, [ids], shape, use, first=opening)
            results = await jobs.run(answers)
        choices = [
            {
                "index": job.index,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": chat_logprobs(job, job.logprobs()),
                "finish_reason": _reason(reason),
            }
            for job, (text, reason) in zip(answers, results)
        ]
        return {**top, "choices": choices, "usage": usage([ids], answers)}

    def chat_logprobs(job: Job, scores: list[TokenLogprob]) -> dict | None:
        if job.request.logprobs is None:
            return None

        def entry(token: int, logprob: float) -> dict:
            return {"token": token_text(tokenizer, token), "logprob": logprob, "bytes": token_bytes(tokenizer, token)}

        content = [entry(s.token, s.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in s.top]} for s in scores]
        return {"content": content, "refusal": None}


def _completion_logprobs(tokenizer, scores: list[TokenLogprob]) -> dict:
    """OpenAI's completion ``logprobs``: tokens, their log-probabilities, alternatives and text offsets."""
    tokens = [token_text(tokenizer, s.token) for s in scores]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [s.logprob for s in scores],
        "top_logprobs": [None if s.logprob is None else _by_text(tokenizer, s.top) for s in scores],
        "text_offset": offsets,
    }


def _by_text(tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    """Alternatives keyed by their text, as OpenAI's completions give them; where two tokens read alike
    (pieces of characters), the more likely one's."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(token_text(tokenizer, token), logprob)
    return out


def _chunk(index: int, delta: dict, logprobs: dict | None, reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}


def _reason(reason: str | None) -> str | None:
    """OpenAI's finish reasons: ``length``, else ``stop`` (end of sequence, a stop string, an echo's score)."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"
