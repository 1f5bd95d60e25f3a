"""The HTTP API (FastAPI): many prefixes over one frozen model, every request batched together.

Endpoints: ``POST /v1/generate``, ``GET/POST /v1/prefixes``, ``DELETE /v1/prefixes/{name}``, ``GET /health``,
``GET /metrics``, and OpenAI's ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``
(:mod:`prefixtune.serving.openai_api`; ``model`` = prefix name). What the routes share between HTTP and the
engine is :mod:`prefixtune.serving.jobs`.
Errors are JSON ``{"error": {"message": ..., "field": ...}}`` with the statuses the OpenAPI schema
documents (:mod:`prefixtune.serving.http`); a request's failure is its own and never takes the server down.
Prefix folders load on first use (:mod:`prefixtune.serving.registry`); API keys and tenants are in
:mod:`prefixtune.serving.tenants`, limits in :mod:`prefixtune.serving.settings`.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, create_model

from .. import options
from ..errors import PrefixTuneError
from .engine import Engine
from .http import PREFIX_NAME, ApiError, BodyLimit, InFlight, Unexpected, documented, error_response, route_label
from .jobs import Job, Jobs
from .metrics import ServerMetrics
from .openai_api import add_routes as add_openai_routes
from .registry import PrefixNotFound, PrefixRegistry, PrefixTooLarge
from .settings import ServerSettings
from .tenants import EVERYTHING, Keys

__all__ = ["PREFIX_NAME", "ServerSettings", "create_app"]

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

    jobs = Jobs(model, tokenizer, engine, registry, settings, in_flight)

    @app.post("/v1/generate", responses=documented(400, 404, 413, 429, 504))
    async def generate(request: Request, body: GenerateBody):
        texts = jobs.inputs(body.inputs, "inputs", body.max_new_tokens)
        opts = jobs.options(body.model_dump(exclude={"prefix", "inputs", "stream"}))
        async with jobs.using(request, body.prefix, "prefix") as use:
            answers = [
                jobs.job(body.prefix, jobs.prompt(body.prefix, t, "inputs"), opts, i) for i, t in enumerate(texts)
            ]
            if body.stream:
                return jobs.sse(answers, _generate_event, _generate_error, use)
            results = await jobs.run(answers)
        return {"prefix": body.prefix, "outputs": [text for text, _ in results]}

    add_openai_routes(app, jobs)
    return app


def _generate_event(job: Job, text: str, reason: str | None, logprobs) -> dict:
    return {"index": job.index, "text": text, "finish_reason": reason}


def _generate_error(job: Job, status: int, message: str) -> dict:
    return {"index": job.index, "error": {"message": message, "status": status}}
