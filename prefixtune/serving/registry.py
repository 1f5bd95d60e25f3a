"""The prefixes a server holds: folders inside one directory, loaded, uploaded and removed by name.

Names are plain folder names inside the directory (letters, digits, ``_ - .``); anything that
could reach outside it is refused. Nothing uploaded is trusted: the tensors define a prefix and must
agree with its config (:func:`prefixtune.files.check_tensors`), within the server's limits on
prefix length, file size and the memory all resident prefixes take. A prefix trained on another
base model is refused with the error naming both models. Folders are replaced atomically and get the
usual permissions (umask), never the 0700 of a temporary directory.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from ..errors import PrefixTuneError
from ..files import CONFIG, WEIGHTS, current_umask, read_json
from ..model import check_prefix_name
from .settings import ServerSettings


class PrefixNotFound(PrefixTuneError):
    """No prefix (or prefix folder) of that name."""


class PrefixTooLarge(PrefixTuneError):
    """A prefix over the server's limits (length, file size, or the memory budget of resident prefixes)."""


class PrefixRegistry:
    """Prefix folders in ``directory``, loaded into ``model`` under their folder names.

    Args:
        model: The :class:`prefixtune.PrefixTunedModel` serving requests.
        directory: The folder holding one sub-folder per prefix.
        lock: Held while the model's prefixes change (the engine holds it during each step).
    """

    def __init__(self, model, directory: str | Path, lock: threading.Lock, settings: ServerSettings | None = None):
        self.model = model
        self.directory = Path(directory).resolve()
        self.lock = lock
        self.settings = settings or ServerSettings()
        if not self.directory.is_dir():
            raise PrefixTuneError(f"{directory}: prefix directory not found")

    def _folder(self, name: str) -> Path:
        path = (self.directory / check_prefix_name(name)).resolve()
        if path.parent != self.directory:
            raise PrefixTuneError(f"invalid prefix name {name!r}: must be a folder directly inside {self.directory}")
        return path

    def load_all(self) -> dict[str, str]:
        """Load every prefix folder in the directory; returns {folder: error} for those refused."""
        refused = {}
        for path in sorted(p for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                self.load(path.name)
            except PrefixTuneError as e:
                refused[path.name] = str(e)
        return refused

    def load(self, name: str) -> dict:
        """Load (or reload) the folder ``name`` of the directory."""
        path = self._folder(name)
        if not (path / CONFIG).is_file():
            raise PrefixNotFound(f"no prefix folder {name!r} in {self.directory}")
        self._load_checked(path, name)
        return self.describe(name)

    def _load_checked(self, path: Path, name: str) -> None:
        """Load folder ``path`` as ``name`` within the limits: length and file size before reading the
        tensors, the memory budget before keeping them."""
        limits = self.settings
        size = (path / WEIGHTS).stat().st_size if (path / WEIGHTS).is_file() else 0
        if size > limits.max_prefix_bytes:
            raise PrefixTooLarge(
                f"{name}: {WEIGHTS} of {size:,} bytes is over the limit of {limits.max_prefix_bytes:,}"
            )
        document = read_json(path / CONFIG)
        tokens = (document.get("prefix_config") or {}).get("num_virtual_tokens") if isinstance(document, dict) else None
        if isinstance(tokens, int) and tokens > limits.max_prefix_tokens:
            raise PrefixTooLarge(f"{name}: {tokens} virtual tokens is over the limit of {limits.max_prefix_tokens}")
        with self.lock:
            held = self.model.resident_bytes() - (self.model.resident_bytes(name) if self.model.has_prefix(name) else 0)
            if held + size > limits.max_prefix_memory:
                raise PrefixTooLarge(
                    f"{name}: resident prefixes would take {held + size:,} bytes, over the budget of "
                    f"{limits.max_prefix_memory:,}; remove some (DELETE /v1/prefixes/NAME) or raise --max-prefix-memory"
                )
            self.model.load_prefix(path, name=name)

    def upload(self, name: str, config: dict, weights_base64: str) -> dict:
        """Save an uploaded prefix (config + base64 safetensors) as folder ``name`` and load it."""
        target = self._folder(name)
        try:
            weights = base64.b64decode(weights_base64, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise PrefixTuneError("weights: not valid base64") from None
        if len(weights) > self.settings.max_prefix_bytes:
            raise PrefixTooLarge(
                f"weights: {len(weights):,} bytes is over the limit of {self.settings.max_prefix_bytes:,}"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".upload-{name}-", dir=self.directory))
        try:
            os.chmod(staging, 0o777 & ~current_umask())  # a folder like any other, not mkdtemp's 0700
            (staging / CONFIG).write_text(json.dumps(config))
            (staging / WEIGHTS).write_bytes(weights)
            self._load_checked(staging, name)  # validates files, tensors, limits and base fingerprint
            self._replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.describe(name)

    def _replace(self, staging: Path, target: Path) -> None:
        """Put ``staging`` at ``target``: the old folder is moved aside first, so readers see one or the other."""
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=self.directory))
            target.rename(old / target.name)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def remove(self, name: str, purge: bool = False) -> None:
        """Unload prefix ``name``; with ``purge``, delete its folder too (else it stays, and loads again at the
        next start)."""
        check_prefix_name(name)
        with self.lock:
            if not self.model.has_prefix(name):
                raise PrefixNotFound(f"unknown prefix {name!r}")
            self.model.remove_prefix(name)
        if purge:
            folder = self._folder(name)
            if folder.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".deleted-{name}-", dir=self.directory))
                folder.rename(trash / name)
                shutil.rmtree(trash, ignore_errors=True)

    def describe(self, name: str) -> dict:
        prefix = self.model.get_prefix(name)
        return {
            "name": name,
            "num_virtual_tokens": prefix.num_tokens,
            "mode": prefix.mode,
            "parameters": sum(p.numel() for p in prefix.parameters()),
        }

    def names(self) -> list[str]:
        return self.model.prefix_names()
