"""The prefixes a server holds: folders inside one directory, loaded, uploaded and removed by name.

Names are plain folder names inside the directory (letters, digits, ``_ - .``); anything that
could reach outside it is refused. Nothing uploaded is trusted: the tensors define a prefix and must
agree with its config (:func:`prefixtune.files.check_tensors`), within the server's limits on
prefix length, file size and the memory all resident prefixes take. A prefix trained on another
base model is refused with the error naming both models. Folders are replaced atomically and get the
usual permissions (umask), never the 0700 of a temporary directory.

Thousands of folders: nothing is loaded at start-up. A prefix is loaded on first use
(:meth:`PrefixRegistry.ensure`), reloaded when its files change on disk, and the least recently used
prefixes are unloaded when the resident ones would exceed the memory budget — except those that
requests are using (:meth:`acquire`). Start-up time and memory do not grow with the number of folders.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import shutil
import tempfile
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from ..errors import PrefixTuneError
from ..files import CONFIG, WEIGHTS, current_umask, read_json, read_prefix_folder
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
        self._used: OrderedDict[str, tuple] = OrderedDict()  # loaded from folders: name → files' stamp, LRU order
        self._pins: Counter[str] = Counter()  # requests using each prefix: never unloaded under them
        self._pin_lock = threading.RLock()  # pins and LRU order; not the engine's: never waits for a decoding step
        self._loading: dict[str, threading.Lock] = {}  # one load at a time per name

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

    def ensure(self, name: str) -> None:
        """Make prefix ``name`` resident: load its folder on first use or when its files changed since."""
        path = self._folder(name)
        stamp = _stamp(path)
        if self._resident(name, stamp):
            return
        if stamp is None:
            raise PrefixNotFound(f"unknown prefix {name!r}")
        with self._pin_lock:
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # requests arriving together for a prefix not yet resident: one loads, the others wait
            if not self._resident(name, stamp):
                self._load_checked(path, name, stamp)

    def _resident(self, name: str, stamp: tuple | None) -> bool:
        """``name`` is loaded, from files that have not changed since (then it becomes the most recently used)."""
        with self._pin_lock:  # not the engine's lock: a resident prefix never waits for a decoding step
            if self.model.has_prefix(name) and self._used.get(name, stamp) == stamp:
                if name in self._used:
                    self._used.move_to_end(name)
                return True
        return False

    def acquire(self, name: str) -> None:
        """A request will use ``name``: make it resident and keep it so until :meth:`release`."""
        with self._pin_lock:
            self._pins[name] += 1
        try:
            self.ensure(name)
        except BaseException:
            self.release(name)
            raise

    def release(self, name: str) -> None:
        with self._pin_lock:
            self._pins[name] -= 1
            if self._pins[name] <= 0:
                del self._pins[name]

    def _load_checked(self, path: Path, name: str, stamp: tuple | None = None) -> None:
        """Load folder ``path`` as ``name`` within the limits: length and file size before reading the
        tensors, the memory budget before keeping them. ``stamp``: the folder's, if just taken."""
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
        stamp = stamp or _stamp(path)
        prefix = read_prefix_folder(self.model, path, document)  # read and checked without holding up decoding
        with self._pin_lock:  # adding a prefix needs no pause in decoding (the engine reads only names it was given)
            if self._held_without(name) + size <= self.settings.max_prefix_memory:
                self._put(name, prefix, path, stamp)
                return
        with self.lock, self._pin_lock:  # unloading others does: lock order is always engine, then pins
            self._make_room(name, size)
            self._put(name, prefix, path, stamp)

    def _put(self, name: str, prefix, path: Path, stamp) -> None:
        self.model.put_prefix(name, prefix)
        if path.parent == self.directory:
            self._used[name] = stamp
            self._used.move_to_end(name)

    def _held_without(self, name: str) -> int:
        return self.model.resident_bytes() - (self.model.resident_bytes(name) if self.model.has_prefix(name) else 0)

    def _make_room(self, name: str, size: int) -> None:
        """Unload least recently used prefixes (not pinned, not ``name``) until ``size`` more bytes fit the budget.
        Called with the engine's lock and the pin lock held."""
        budget = self.settings.max_prefix_memory
        held = self._held_without(name)
        for old in list(self._used):
            if held + size <= budget:
                break
            if old == name or self._pins[old] > 0 or not self.model.has_prefix(old):
                continue
            held -= self.model.resident_bytes(old)
            self.model.remove_prefix(old)
            del self._used[old]
        if held + size > budget:
            raise PrefixTooLarge(
                f"{name}: resident prefixes would take {held + size:,} bytes, over the budget of {budget:,} even after "
                "unloading the unused ones; raise --max-prefix-memory"
            )

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
        with self.lock, self._pin_lock:
            if not self.model.has_prefix(name):
                raise PrefixNotFound(f"unknown prefix {name!r}")
            self.model.remove_prefix(name)
            self._used.pop(name, None)
        if purge:
            folder = self._folder(name)
            if folder.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".deleted-{name}-", dir=self.directory))
                folder.rename(trash / name)
                shutil.rmtree(trash, ignore_errors=True)

    def describe(self, name: str) -> dict:
        """Name, length, mode and size of a prefix, resident or not (then read from its config)."""
        if self.model.has_prefix(name):
            prefix = self.model.get_prefix(name)
            return {
                "name": name,
                "num_virtual_tokens": prefix.num_tokens,
                "mode": prefix.mode,
                "parameters": sum(p.numel() for p in prefix.parameters()),
                "resident": True,
            }
        try:
            document = read_json(self._folder(name) / CONFIG)
            config = document["prefix_config"]
            sizes = [math.prod(shape) for shape in document["parts"].values()]
            return {
                "name": name,
                "num_virtual_tokens": config["num_virtual_tokens"],
                "mode": config.get("mode", "kv"),
                "parameters": sum(sizes),
                "resident": False,
            }
        except (PrefixTuneError, KeyError, TypeError, AttributeError, ValueError):
            return {"name": name, "resident": False, "error": "unreadable prefix_config.json"}

    def known(self, name: str) -> bool:
        """Whether a request may name ``name``: resident, or a prefix folder of the directory."""
        return self.model.has_prefix(name) or (_is_name(name) and (self.directory / name / CONFIG).is_file())

    def names(self) -> list[str]:
        """Every prefix a request may name: those resident and every folder of the directory."""
        folders = {e.name for e in os.scandir(self.directory) if e.is_dir() and _is_name(e.name)}
        return sorted(set(self.model.prefix_names()) | folders)


def _is_name(name: str) -> bool:
    """Whether a folder's name is a prefix name (:func:`prefixtune.model.check_prefix_name`)."""
    try:
        check_prefix_name(name)
    except PrefixTuneError:
        return False
    return True


def _stamp(path: Path) -> tuple | None:
    """What changes when a prefix folder's files change (modification times and sizes); None without a config."""
    try:
        return tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in (path / CONFIG, path / WEIGHTS))
    except OSError:
        return None
