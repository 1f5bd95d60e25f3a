"""The HTTP API (FastAPI): many prefixes over one frozen model, every request batched together.

Endpoints: ``POST /v1/generate``, ``POST /v1/completions`` (OpenAI-style, ``model`` = prefix name),
``GET/POST /v1/prefixes``, ``DELETE /v1/prefixes/{name}``, ``GET /health``, ``GET /metrics``.
Errors are JSON ``{"error": {"message": ..., "field": ...}}`` with the statuses the OpenAPI schema
documents (:mod:`prefixtune.serving.http`); a request's failure is its own and never takes the server down.
Prefix folders load on first use (:mod:`prefixtune.serving.registry`); API keys and tenants are in
:mod:`prefixtune.serving.tenants`, limits in :mod:`prefixtune.serving.settings`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, create_model

from .. import options
from ..errors import PrefixTuneError
from ..model import NAME_CHARS
from ..options import GenerationOptions
from .engine import Engine
from .engine import Request as EngineRequest
from .http import ApiError, BodyLimit, InFlight, Unexpected, documented, error_response, route_label
from .metrics import ServerMetrics
from .registry import PrefixNotFound, PrefixRegistry, PrefixTooLarge
from .settings import ServerSettings
from .tenants import EVERYTHING, Keys
from .text import TextStream, prompt_ids

PREFIX_NAME = f"^{NAME_CHARS}$"


GenerateBody = create_model(
    "GenerateBody",
    __config__=ConfigDict(extra="forbid"),
    prefix=(str, Field(pattern=PREFIX_NAME, description="name of the prefix to decode with")),
    inputs=(
        str | Annotated[list[str], Field(min_length=1)],
        Field(description="one input text, or a list decoded as a batch"),
    ),
    stream=(StrictBool, Field(False, description="send tokens as server-sent events")),
    **options.pydantic_fields(),
)

# OpenAI's completion fields: max_tokens is max_new_tokens; temperature 0 means greedy.
_OPENAI_NAMES = {name: None for name in ("min_new_tokens", "num_beams", "do_sample", "top_k", "temperature")}
_OPENAI_NAMES |= {"max_new_tokens": "max_tokens", "length_penalty": None, "early_stopping": None}
CompletionBody = create_model(
    "CompletionBody",
    __config__=ConfigDict(extra="allow"),  # other OpenAI fields: accepted at their defaults, else refused (400)
    model=(str, Field(pattern=PREFIX_NAME, description="name of the prefix")),
    prompt=(str | Annotated[list[str], Field(min_length=1)], Field(description="one prompt, or a list")),
    stream=(StrictBool, False),
    temperature=(
        StrictFloat,
        Field(1.0, ge=0, le=options.bounds("temperature")["le"], allow_inf_nan=False, description="0 = greedy"),
    ),
    **options.pydantic_fields(_OPENAI_NAMES, {"max_new_tokens": 16}),
)


# OpenAI completion fields this server does not implement, at the values that ask for nothing ("user" is
# metadata); any other value, or any other field, is refused with a 400 naming it, never ignored.
_OPENAI_INERT = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None, "logit_bias": None}
_OPENAI_INERT |= {"presence_penalty": 0, "frequency_penalty": 0, "stream_options": None}


def _unimplemented(body) -> None:
    extra = body.model_extra or {}
    refused = sorted(k for k, v in extra.items() if k != "user" and (k not in _OPENAI_INERT or v != _OPENAI_INERT[k]))
    if refused:
        raise ApiError(400, f"not implemented by this server: {', '.join(refused)}", refused[0])


class PrefixBody(BaseModel):
    """Load a prefix folder of the server's directory by name, or upload one (config and weights)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=PREFIX_NAME, description="letters, digits, '_', '-', '.'; no '..'")
    config: dict | None = Field(None, description="prefix_config.json of an upload")
    weights: str | None = Field(None, pattern=r"^[A-Za-z0-9+/]*={0,2}$", description="base64 of prefix.safetensors")


def create_app(model, tokenizer, prefix_dir, settings: ServerSettings | None = None, engine: Engine | None = None):
    """Build the FastAPI app serving ``model``'s prefixes from ``prefix_dir``.

    The engine's thread starts and stops with the app (lifespan); shutdown finishes the requests
    in flight first.
    """
    settings = settings or ServerSettings()
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    engine = engine or Engine(model, eos, pad, settings.max_batch_size, prefill_budget=settings.prefill_budget)
    registry = PrefixRegistry(model, prefix_dir, engine.lock, settings)
    metrics = ServerMetrics()
    keys = Keys.build(settings.api_key, settings.keys)
    in_flight = InFlight(settings.max_requests_per_key)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop(drain=True, timeout=settings.request_timeout)

    app = FastAPI(title="prefixtune", version="1", lifespan=lifespan)
    app.state.engine, app.state.registry, app.state.metrics, app.state.refused = engine, registry, metrics, {}
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, upload_limit=settings.max_upload_bytes)
    app.add_middleware(Unexpected, on_error=lambda scope: metrics.request(route_label(app, scope), 500, 0.0))

    @app.middleware("http")
    async def auth_and_metrics(request: Request, call_next):
        started = time.monotonic()
        request.state.tenant, request.state.key = EVERYTHING, ""
        if keys.required and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            tenant = keys.find(given)
            if tenant is None:
                response = error_response(
                    401, "missing or wrong API key (Authorization: Bearer <key>)", "authorization"
                )
                metrics.request(route_label(app, request.scope), 401, time.monotonic() - started)
                return response
            request.state.tenant, request.state.key = tenant, given
        response = await call_next(request)
        metrics.request(route_label(app, request.scope), response.status_code, time.monotonic() - started)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.field)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        location = [str(x) for x in first.get("loc", ()) if x != "body"]
        field = location[0] if location else None  # the request field, not pydantic's union branch
        status = 400 if first.get("type") == "json_invalid" else 422
        return error_response(status, f"{field or 'body'}: {first.get('msg')}", field)

    @app.exception_handler(PrefixTuneError)
    async def library_error(request, exc: PrefixTuneError):
        status = 404 if isinstance(exc, PrefixNotFound) else 413 if isinstance(exc, PrefixTooLarge) else 400
        return error_response(status, str(exc))

    @app.get("/health", responses=documented())
    async def health():
        return {
            "status": "ok",
            "model": model.base_name,
            "resident_prefixes": len(model.prefix_names()),
            "busy": engine.busy,
        }

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}, **documented()},
    )
    async def prometheus():
        metrics.absorb(engine.stats)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", responses=documented())
    async def list_models(request: Request):
        """OpenAI's model list: each prefix this key may use is a model, the base model its root."""
        names = [n for n in registry.names() if request.state.tenant.may_use(n)]
        return {"object": "list", "data": [_model_card(n) for n in names]}

    @app.get("/v1/models/{name}", responses=documented(404))
    async def get_model(request: Request, name: Annotated[str, Path(pattern=PREFIX_NAME)]):
        if not request.state.tenant.may_use(name) or not registry.known(name):
            raise ApiError(404, f"unknown prefix {name!r}", "name")
        return _model_card(name)

    def _model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "prefixtune", "root": model.base_name}

    @app.get("/v1/prefixes", responses=documented())
    async def list_prefixes(request: Request):
        tenant = request.state.tenant
        return {"prefixes": [registry.describe(n) for n in registry.names() if tenant.may_use(n)]}

    def _may_manage(request: Request, name: str) -> None:
        tenant = request.state.tenant
        if not tenant.may_use(name):
            raise ApiError(404, f"unknown prefix {name!r}", "name")  # as if it did not exist
        if not tenant.may_manage(name):
            raise ApiError(403, f"this API key may use prefix {name!r} but not load, upload or delete it", "name")

    @app.post("/v1/prefixes", status_code=201, responses=documented(400, 403, 404, 413))
    async def add_prefix(request: Request, body: PrefixBody):
        _may_manage(request, body.name)
        if (body.config is None) != (body.weights is None):
            raise ApiError(400, "an upload needs both 'config' and 'weights'", "weights")
        if body.config is not None:
            return await asyncio.to_thread(registry.upload, body.name, body.config, body.weights)
        return await asyncio.to_thread(registry.load, body.name)

    @app.delete("/v1/prefixes/{name}", responses=documented(400, 403, 404))  # requests already running finish
    async def delete_prefix(
        request: Request,
        name: Annotated[str, Path(pattern=PREFIX_NAME)],
        purge: Annotated[
            bool, Query(description="also delete its folder (else it loads again at the next start)")
        ] = False,
    ):
        _may_manage(request, name)
        await asyncio.to_thread(registry.remove, name, purge)
        return {"deleted": name, "purged": purge}

    @asynccontextmanager
    async def _using(request: Request, name: str, field: str):
        """Prefix ``name`` resident (loaded on first use) and kept so while the request runs; a stream takes
        over releasing it (``use["stream"] = True``) when its last event is sent."""
        if not request.state.tenant.may_use(name):
            raise ApiError(404, f"unknown prefix {name!r}", field)
        key = in_flight.enter(request.state.key)  # 429 before anything is loaded
        try:
            await asyncio.to_thread(registry.acquire, name)
        except PrefixNotFound:
            in_flight.leave(key)
            raise ApiError(404, f"unknown prefix {name!r}", field) from None
        except BaseException:
            in_flight.leave(key)
            raise
        use = {"stream": False, "key": key}
        try:
            yield use
        finally:
            if not use["stream"]:
                registry.release(name)
                in_flight.leave(key)

    def _requests(prefix, texts, field, opts: GenerationOptions) -> list[tuple[EngineRequest, TextStream]]:
        out = []
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(400, f"text that cannot be encoded as UTF-8 ({e.reason} at {e.start})", field) from None
            try:
                ids = prompt_ids(model, tokenizer, prefix, text)
            except PrefixTuneError as e:
                raise ApiError(400, str(e), field) from None
            except Exception as e:  # noqa: BLE001 - the tokenizer refused this text
                raise ApiError(400, f"the tokenizer cannot encode this text ({type(e).__name__}: {e})", field) from None
            if len(ids) > settings.max_input_tokens:
                raise ApiError(
                    400, f"input of {len(ids)} tokens exceeds the limit of {settings.max_input_tokens}", field
                )
            stream = TextStream(tokenizer, opts.stop)
            out.append((EngineRequest(prefix, ids, opts, should_stop=stream.should_stop), stream))
        return out

    def _options(values: dict) -> GenerationOptions:
        try:
            return GenerationOptions.from_kwargs(**values)
        except PrefixTuneError as e:
            raise ApiError(422, str(e), str(e).split(" ", 1)[0]) from None

    def _common_checks(texts, field, max_new):
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ApiError(422, "needs at least one input", field)
        if len(texts) > settings.max_batch_size:
            raise ApiError(400, f"{len(texts)} inputs exceed the batch limit of {settings.max_batch_size}", field)
        if max_new > settings.max_new_tokens:
            raise ApiError(400, f"at most {settings.max_new_tokens} new tokens", "max_new_tokens")
        return texts

    @app.post("/v1/generate", responses=documented(400, 404, 413, 429, 504))
    async def generate(request: Request, body: GenerateBody):
        texts = _common_checks(body.inputs, "inputs", body.max_new_tokens)
        opts = _options(body.model_dump(exclude={"prefix", "inputs", "stream"}))
        async with _using(request, body.prefix, "prefix") as use:
            jobs = _requests(body.prefix, texts, "inputs", opts)
            if body.stream:
                return _sse(jobs, _generate_event, _generate_error, body.prefix, use)
            results = await _run(jobs)
        return {"prefix": body.prefix, "outputs": [text for text, _ in results]}

    @app.post("/v1/completions", responses=documented(400, 404, 413, 429, 504))
    async def completions(request: Request, body: CompletionBody):
        _unimplemented(body)
        texts = _common_checks(body.prompt, "prompt", body.max_tokens)
        given = body.model_dump(exclude={"model", "prompt", "stream", "max_tokens", "temperature", *body.model_extra})
        sampled = {"do_sample": True, "temperature": body.temperature} if body.temperature > 0 else {}
        opts = _options({**given, **sampled, "max_new_tokens": body.max_tokens})
        ident, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": ident, "object": "text_completion", "created": created, "model": body.model}
        async with _using(request, body.model, "model") as use:
            jobs = _requests(body.model, texts, "prompt", opts)
            if body.stream:

                def chunk(i, delta, reason):
                    return {**head, "choices": [_openai_choice(i, delta, reason)]}

                return _sse(jobs, chunk, _openai_error, body.model, use)
            results = await _run(jobs)
        prompt_tokens = sum(len(r.input_ids) for r, _ in jobs)
        completion_tokens = sum(len(r.tokens) for r, _ in jobs)
        return {
            **head,
            "choices": [_openai_choice(i, text, reason) for i, (text, reason) in enumerate(results)],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _run(jobs) -> list[tuple[str, str]]:
        loop = asyncio.get_running_loop()
        futures = []
        for request, _ in jobs:
            future = loop.create_future()
            request.on_done = lambda reason, tokens, f=future: loop.call_soon_threadsafe(_resolve, f, reason)
            futures.append(future)
            engine.submit(request)
        try:
            reasons = await asyncio.wait_for(asyncio.gather(*futures), settings.request_timeout)
        except asyncio.TimeoutError:
            for request, _ in jobs:
                request.cancelled = True
            raise ApiError(504, f"request timed out after {settings.request_timeout:.0f} s") from None
        failed = next((request.error for (request, _), r in zip(jobs, reasons) if r == "error"), None)
        if failed:
            raise ApiError(*failed)
        return [(stream.final(request.tokens), reason) for (request, stream), reason in zip(jobs, reasons)]

    async def _stream_events(jobs, shape, fail):
        """Server-sent events of every job: ``shape(i, text, finish reason)``, or ``fail(i, status, message)``
        for a job that failed (an error event, never a normal finish)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        for i, (request, _) in enumerate(jobs):
            request.on_token = lambda token, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, "token", None))
            request.on_done = lambda reason, tokens, i=i: loop.call_soon_threadsafe(
                queue.put_nowait, (i, "done", reason)
            )
            engine.submit(request)
        open_jobs, deadline = len(jobs), loop.time() + settings.request_timeout
        try:
            while open_jobs:
                try:
                    i, kind, reason = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0.001))
                except asyncio.TimeoutError:
                    yield {"error": {"message": f"request timed out after {settings.request_timeout:.0f} s"}}
                    return
                request, stream = jobs[i]
                if kind == "token":
                    delta = stream.delta(request.tokens)
                    if delta:
                        yield shape(i, delta, None)
                elif reason == "error":
                    open_jobs -= 1
                    yield fail(i, *request.error)
                else:
                    open_jobs -= 1
                    yield shape(i, stream.rest(request.tokens), reason)
        finally:
            if open_jobs:  # timed out or the client went away: free the batch slots
                for request, _ in jobs:
                    request.cancelled = True

    def _sse(jobs, shape, fail, prefix: str, use: dict) -> StreamingResponse:
        """The jobs' events as a server-sent event stream (see :func:`_stream_events`)."""
        events = _stream_events(jobs, shape, fail)
        use["stream"] = True  # the stream releases the prefix and the key's slot when it ends

        async def body():
            try:
                async for event in events:
                    yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                in_flight.leave(use["key"])
                registry.release(prefix)

        return StreamingResponse(body(), media_type="text/event-stream")

    return app


def _resolve(future: asyncio.Future, reason: str) -> None:
    if not future.done():
        future.set_result(reason)


def _generate_event(index: int, text: str, reason: str | None) -> dict:
    return {"index": index, "text": text, "finish_reason": reason}


def _generate_error(index: int, status: int, message: str) -> dict:
    return {"index": index, "error": {"message": message, "status": status}}


def _openai_choice(index: int, text: str, reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": _openai_reason(reason)}


def _openai_error(index: int, status: int, message: str) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status, "index": index}}


def _openai_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"
