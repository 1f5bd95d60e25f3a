"""A server's limits and security, declared once: ``prefixtune serve``'s flags are made from these fields."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ServerSettings:
    """Limits and security of a server (each field is a ``prefixtune serve`` flag)."""

    api_key: str | None = _setting(
        None, "require 'Authorization: Bearer KEY' on every endpoint but /health (default: $PREFIXTUNE_API_KEY)"
    )
    keys: str | None = _setting(
        None, "JSON file mapping API keys to the prefix name patterns each may use and whether it may manage them"
    )
    max_input_tokens: int = _setting(1024, "longest prompt, in tokens")
    max_new_tokens: int = _setting(512, "largest max_new_tokens (max_tokens)")
    max_batch_size: int = _setting(32, "most inputs in one request, and rows decoded at once")
    max_body_bytes: int = _setting(1_000_000, "largest request body, in bytes (prefix uploads: see --max-prefix-bytes)")
    request_timeout: float = _setting(120.0, "seconds before a request is abandoned with 504")
    max_requests_per_key: int = _setting(64, "generation requests one API key may have in flight (then 429)")
    prefill_budget: int = _setting(
        256, "prompt tokens prefilled per decoding step: longer prompts are prefilled in chunks between steps"
    )
    max_prefix_tokens: int = _setting(1024, "longest prefix a folder or an upload may hold, in virtual tokens")
    max_prefix_bytes: int = _setting(100_000_000, "largest prefix.safetensors a folder or an upload may hold, in bytes")
    max_prefix_memory: int = _setting(
        4_000_000_000,
        "most memory all resident prefixes take together, in bytes (past it, the least recently used unload)",
    )

    @property
    def max_upload_bytes(self) -> int:
        """Largest body of a prefix upload: the weights in base64 (4/3 of their size) and their config."""
        return max(self.max_body_bytes, self.max_prefix_bytes * 4 // 3 + 1_000_000)


def add_flags(parser, positive) -> None:
    """One ``--flag`` per setting, with its default and help; ``positive(type)`` parses numbers > 0."""
    for f in fields(ServerSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "str | None":
            parser.add_argument(
                flag, default=None, metavar="FILE" if f.name == "keys" else "KEY", help=f.metadata["help"]
            )
            continue
        kind = float if f.type == "float" else int
        parser.add_argument(
            flag,
            type=positive(kind),
            default=f.default,
            metavar="SECONDS" if kind is float else "N",
            help=f"{f.metadata['help']} (default: {f.default:,})",
        )


def from_flags(args) -> ServerSettings:
    values = {f.name: getattr(args, f.name) for f in fields(ServerSettings)}
    values["api_key"] = values["api_key"] or os.environ.get("PREFIXTUNE_API_KEY") or None
    return ServerSettings(**values)
