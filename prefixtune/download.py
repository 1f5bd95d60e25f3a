"""Fetching the paper's data sets from their official release locations, checked by SHA-256.

Every file in ``data_manifest.json`` is downloaded to a temporary name, its SHA-256 compared
with the manifest, and only then renamed into place. Files already present with the right hash are
kept. Offline, the first failed request ends the download with a message saying what to do instead.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

from .data import TASK_DIRS
from .errors import PrefixTuneError
from .files import atomic_write

DOWNLOADABLE = ("e2e", "webnlg", "dart")


def manifest() -> dict:
    return json.loads(resources.files("prefixtune").joinpath("data_manifest.json").read_text())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(task: str, root: Path, base_url: str | None = None, timeout: float = 30.0, progress=None) -> Path:
    """Download ``task``'s files into ``root/<task dir>``; returns that folder.

    Args:
        task: ``e2e``, ``webnlg`` or ``dart``.
        root: Data root (the layout ``PREFIXTUNE_DATA`` expects).
        base_url: Override the release location (a mirror, or ``file://`` for tests).
        timeout: Seconds per request.
        progress: Optional callable(path) called after each file.
    """
    if task not in DOWNLOADABLE:
        raise PrefixTuneError(f"cannot download {task!r}; choose one of {', '.join(DOWNLOADABLE)}")
    entry = manifest()[task]
    base = base_url or entry["base_url"]
    folder = Path(root) / TASK_DIRS[task]
    for item in entry["files"]:
        target = folder / item["path"]
        if target.is_file() and sha256(target) == item["sha256"]:
            continue
        url = base.rstrip("/") + "/" + item["path"]
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise PrefixTuneError(
                f"cannot download {url} ({reason}); this machine may be offline: copy the data set and pass "
                "--data PATH or set PREFIXTUNE_DATA"
            ) from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != item["sha256"]:
            raise PrefixTuneError(f"{url}: SHA-256 {digest} does not match the expected {item['sha256']}; not saved")
        atomic_write(target, lambda p, data=data: p.write_bytes(data))
        if progress is not None:
            progress(target)
    return folder
