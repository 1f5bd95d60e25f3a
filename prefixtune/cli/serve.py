"""``prefixtune serve``: an HTTP server for many prefixes over one frozen model."""

from __future__ import annotations

import sys

from ..serving.settings import add_flags as add_setting_flags
from .common import add_decode_weights, add_device, cache_dir, device_and_dtype, dtype_note, positive


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve many prefixes over one frozen model (HTTP, batched across prefixes)",
        description="Load the base model once, then serve the prefix folders of --prefixes (each loaded on first "
        "use, the least recently used unloaded past --max-prefix-memory): /v1/generate, "
        "OpenAI's /v1/completions, /v1/chat/completions and /v1/models (model = prefix name), /v1/prefixes, /health "
        "and /metrics. Requests with "
        "different prefixes are decoded together, one forward pass per step.",
    )
    p.add_argument("--model", default=None, help="base model (default: SmolLM2-135M-Instruct)")
    p.add_argument("--prefixes", required=True, help="folder with one prefix folder per name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    add_setting_flags(p, positive)
    add_device(p)
    add_decode_weights(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from ..base import DEFAULT_MODEL, load_base
    from ..model import PrefixTunedModel
    from ..serving.app import create_app
    from ..serving.settings import from_flags as settings_from_flags

    settings = settings_from_flags(args)
    device, dtype = device_and_dtype(args)
    base, tokenizer = load_base(args.model, dtype=dtype, device=device, cache_dir=cache_dir())
    model = PrefixTunedModel(base, tokenizer)
    model.decode_weights = args.decode_weights
    model.base_name = args.model or DEFAULT_MODEL
    app = create_app(model, tokenizer, args.prefixes, settings)
    found = len(app.state.registry.names())
    print(
        f"prefixtune: serving the {found} prefix folders of {args.prefixes} (each loaded on first use) on "
        f"http://{args.host}:{args.port}; model in {dtype_note(args)}",
        file=sys.stderr,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        timeout_graceful_shutdown=int(settings.request_timeout),
    )
    return 0
