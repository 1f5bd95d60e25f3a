"""Who may do what: API keys, each with the prefix names it may use and whether it may manage them.

``prefixtune serve --keys FILE`` reads a JSON object mapping each API key to its tenant::

    {"key-of-acme": {"prefixes": ["acme-*"], "manage": true},
     "key-of-beta": {"prefixes": ["beta-*", "shared"], "manage": false}}

``prefixes`` are shell-style patterns (``fnmatch``, case-sensitive); ``manage`` lets the key load,
upload and delete prefixes whose names match. A tenant never sees another's prefixes: listing shows
its own only, and using one it may not gives the same 404 as a prefix that does not exist.
``--api-key KEY`` is one key that may use and manage every prefix. Without either, the server is open.
"""

from __future__ import annotations

import fnmatch
import hmac
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import PrefixTuneError


@dataclass(frozen=True)
class Tenant:
    """What one API key may do."""

    prefixes: tuple[str, ...] = ("*",)
    manage: bool = True

    def may_use(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.prefixes)

    def may_manage(self, name: str) -> bool:
        return self.manage and self.may_use(name)


EVERYTHING = Tenant()


class Keys:
    """The API keys a server accepts, each with its :class:`Tenant`; empty means no key is needed."""

    def __init__(self, tenants: dict[str, Tenant] | None = None) -> None:
        self._tenants = [(key.encode(), tenant) for key, tenant in (tenants or {}).items()]

    @property
    def required(self) -> bool:
        return bool(self._tenants)

    def find(self, given: str) -> Tenant | None:
        """The tenant of key ``given``, or None; every key is compared in constant time."""
        found = None
        for key, tenant in self._tenants:
            if hmac.compare_digest(given.encode(), key):
                found = tenant
        return found

    @classmethod
    def build(cls, api_key: str | None, keys_file: str | Path | None) -> Keys:
        tenants = read_keys(keys_file) if keys_file else {}
        if api_key:
            tenants[api_key] = EVERYTHING
        return cls(tenants)


def read_keys(path: str | Path) -> dict[str, Tenant]:
    """Read a keys file (see the module docstring); errors name the file and what to fix."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrefixTuneError(f"{path}: cannot read the keys file ({e})") from None
    if not isinstance(document, dict) or not document:
        raise PrefixTuneError(f'{path}: expected a JSON object {{"KEY": {{"prefixes": [...], "manage": bool}}}}')
    tenants = {}
    for key, entry in document.items():
        where = f"{path}: key {key[:4]}…"
        if len(key) < 8:
            raise PrefixTuneError(f"{where}: API keys must be at least 8 characters")
        if not isinstance(entry, dict) or set(entry) - {"prefixes", "manage"}:
            raise PrefixTuneError(f'{where}: expected {{"prefixes": [patterns], "manage": true|false}}')
        patterns, manage = entry.get("prefixes"), entry.get("manage", False)
        if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise PrefixTuneError(f"{where}: 'prefixes' must be a non-empty list of name patterns")
        if not isinstance(manage, bool):
            raise PrefixTuneError(f"{where}: 'manage' must be true or false")
        tenants[key] = Tenant(tuple(patterns), manage)
    return tenants
