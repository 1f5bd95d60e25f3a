"""The prefixes a server holds: folders inside one directory, loaded, uploaded and removed by name.

Names are plain folder names inside the directory (letters, digits, ``_ - .``); anything that
could reach outside it is refused. A prefix trained on another base model is refused with the
error naming both models.
"""

from __future__ import annotations

import base64
import binascii
import json
import shutil
import tempfile
import threading
from pathlib import Path

from ..errors import PrefixTuneError
from ..files import CONFIG, WEIGHTS
from ..model import check_prefix_name


class PrefixNotFound(PrefixTuneError):
    """No prefix (or prefix folder) of that name."""


class PrefixRegistry:
    """Prefix folders in ``directory``, loaded into ``model`` under their folder names.

    Args:
        model: The :class:`prefixtune.PrefixTunedModel` serving requests.
        directory: The folder holding one sub-folder per prefix.
        lock: Held while the model's prefixes change (the engine holds it during each step).
    """

    def __init__(self, model, directory: str | Path, lock: threading.Lock) -> None:
        self.model = model
        self.directory = Path(directory).resolve()
        self.lock = lock
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
        with self.lock:
            self.model.load_prefix(path, name=name)
        return self.describe(name)

    def upload(self, name: str, config: dict, weights_base64: str) -> dict:
        """Save an uploaded prefix (config + base64 safetensors) as folder ``name`` and load it."""
        target = self._folder(name)
        try:
            weights = base64.b64decode(weights_base64, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise PrefixTuneError("weights: not valid base64") from None
        staging = Path(tempfile.mkdtemp(prefix=f".upload-{name}-", dir=self.directory))
        try:
            (staging / CONFIG).write_text(json.dumps(config))
            (staging / WEIGHTS).write_bytes(weights)
            with self.lock:
                self.model.load_prefix(staging, name=name)  # validates files and base fingerprint
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.describe(name)

    def remove(self, name: str) -> None:
        """Unload prefix ``name`` (its folder stays on disk)."""
        check_prefix_name(name)
        with self.lock:
            if not self.model.has_prefix(name):
                raise PrefixNotFound(f"unknown prefix {name!r}")
            self.model.remove_prefix(name)

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
