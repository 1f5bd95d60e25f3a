"""``prefixtune serve``: an HTTP server for many prefixes over one frozen model."""

from __future__ import annotations

import os
import sys

from .common import add_device, cache_dir, device_and_dtype, positive


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve many prefixes over one frozen model (HTTP, batched across prefixes)",
        description="Load the base model once and every prefix folder in --prefixes, then serve /v1/generate, "
        "/v1/completions (OpenAI-style, model = prefix name), /v1/prefixes, /health and /metrics. Requests with "
        "different prefixes are decoded together, one forward pass per step.",
    )
    p.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prefixes", required=True, help="folder with one prefix folder per name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health (default: $PREFIXTUNE_API_KEY)",
    )
    p.add_argument("--max-batch-size", type=positive(int), default=32, help="rows decoded at once (default: 32)")
    p.add_argument("--max-input-tokens", type=positive(int), default=1024, help="longest prompt (default: 1024)")
    p.add_argument("--max-new-tokens", type=positive(int), default=512, help="largest max_new_tokens (default: 512)")
    p.add_argument("--max-body-bytes", type=positive(int), default=1_000_000, help="largest body (default: 1 MB)")
    p.add_argument("--request-timeout", type=positive(float), default=120.0, help="seconds per request (default: 120)")
    add_device(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from ..base import DEFAULT_MODEL, load_base
    from ..model import PrefixTunedModel
    from ..serving.app import ServerSettings, create_app

    settings = ServerSettings(
        api_key=args.api_key or os.environ.get("PREFIXTUNE_API_KEY") or None,
        max_input_tokens=args.max_input_tokens,
        max_new_tokens=args.max_new_tokens,
        max_batch_size=args.max_batch_size,
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
    )
    device, dtype = device_and_dtype(args)
    base, tokenizer = load_base(args.model, dtype=dtype, device=device, cache_dir=cache_dir())
    model = PrefixTunedModel(base, tokenizer)
    model.base_name = args.model or DEFAULT_MODEL
    app = create_app(model, tokenizer, args.prefixes, settings)
    for name, reason in app.state.registry.load_all().items():
        print(f"prefixtune: refused prefix {name!r}: {reason}", file=sys.stderr)
    print(
        f"prefixtune: serving {len(model.prefix_names())} prefixes on http://{args.host}:{args.port}", file=sys.stderr
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=int(settings.request_timeout),
    )
    return 0
