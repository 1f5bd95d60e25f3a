"""Prefix folders on disk: ``prefix.safetensors`` + ``prefix_config.json``, written atomically.

A saved prefix is always ejected (flat tensors, §4.3) and records the base model it was trained on
by name and fingerprint, so it is never silently applied to another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import PrefixConfig
from .errors import PrefixTuneError
from .prefix import Prefix, token_shapes

WEIGHTS = "prefix.safetensors"
CONFIG = "prefix_config.json"
FORMAT = "prefixtune-prefix"
VERSION = 1
# Config keys that describe how a model was loaded or saved, not what it computes.
_VOLATILE = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "quantization_config",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "use_cache",
    "architectures",
}


def fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's config and weights, the same in fp32 and bf16.

    Hashes the config (minus loading details) and, for every weight, its name, shape and 64
    evenly spaced values rounded to bf16.
    """
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        count = min(flat.numel(), 64)
        index = (torch.arange(count) * (flat.numel() - 1) // max(count - 1, 1)).to(flat.device)
        sample = flat[index].to(torch.bfloat16).float().cpu()
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def base_fingerprint(model) -> str:
    """The fingerprint of a :class:`PrefixTunedModel`'s base, computed once."""
    if model.base_fingerprint is None:
        model.base_fingerprint = fingerprint(model.base)
    return model.base_fingerprint


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the result onto ``path``: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def lines_text(texts) -> str:
    """One text per line: every line break inside a text (``\\n``, ``\\r``, U+2028, ...: whatever
    ``str.splitlines`` splits on) becomes a space, so line i is text i for every reader."""
    return "".join(" ".join(t.splitlines()) + "\n" for t in texts)


def write_lines(path: Path, texts) -> None:
    """:func:`lines_text` of ``texts``, written atomically as UTF-8."""
    text = lines_text(texts)
    atomic_write(Path(path), lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def save_prefix(model, path, name: str, metadata: dict | None = None) -> None:
    """Write prefix ``name`` of ``model`` as a folder (ejected), atomically per file."""
    path = Path(path)
    prefix = model.get_prefix(name)
    tensors = prefix.flat_state()
    config = prefix.config.to_dict()
    document = {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "base_model": {
            "name": model.base_name,
            "fingerprint": base_fingerprint(model),
            "model_type": model.geometry.model_type,
        },
        "geometry": model.geometry.to_dict(),
        "num_virtual_tokens": prefix.num_tokens,
        "mode": prefix.mode,
        "parts": {k: list(v.shape) for k, v in tensors.items()},
        "prefix_config": {**config, "reparameterize": False},
        "training": {"reparameterized": config["reparameterize"], **(metadata or {})},
    }
    cpu = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path / WEIGHTS, lambda p: save_file(cpu, str(p), metadata={"format": FORMAT}))
    write_json(path / CONFIG, document)


def read_json(file: Path) -> dict:
    """A JSON object from ``file``; a clear error if it is missing or not valid JSON."""
    if not file.is_file():
        raise PrefixTuneError(f"{file}: missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrefixTuneError(f"{file}: corrupted or truncated JSON ({e})") from None


def read_prefix_config(path, document=None) -> dict:
    """Read and check ``prefix_config.json`` of a prefix folder (``document``: its contents, if already read)."""
    path = Path(path)
    file = path / CONFIG
    if not path.is_dir():
        raise PrefixTuneError(f"{path}: not a prefix folder (expected a directory with {CONFIG} and {WEIGHTS})")
    if document is None:
        if not file.is_file():
            raise PrefixTuneError(f"{file}: missing; not a prefix folder")
        document = read_json(file)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise PrefixTuneError(f"{file}: not a prefixtune prefix config (format field is not {FORMAT!r})")
    for field in ("base_model", "geometry", "parts", "prefix_config", "num_virtual_tokens"):
        if field not in document:
            raise PrefixTuneError(f"{file}: missing field {field!r}")
    return document


def read_prefix_tensors(path, document: dict) -> dict[str, torch.Tensor]:
    """Read ``prefix.safetensors`` and check its tensors against the config."""
    file = Path(path) / WEIGHTS
    if not file.is_file():
        raise PrefixTuneError(f"{file}: missing")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise PrefixTuneError(f"{file}: corrupted or truncated safetensors file ({e})") from None
    expected = {k: tuple(v) for k, v in document["parts"].items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != expected:
        raise PrefixTuneError(f"{file}: tensors {found} do not match {CONFIG} parts {expected}")
    return tensors


def load_prefix(model, path, name: str | None = None) -> Prefix:
    """Load a prefix folder into ``model`` under ``name`` (default: the folder name)."""
    return model.put_prefix(name or Path(path).resolve().name, read_prefix_folder(model, path))


def read_prefix_folder(model, path, document: dict | None = None) -> Prefix:
    """The prefix a folder holds, checked against ``model`` (base, geometry, tensors), without adding it.
    ``document``: its prefix_config.json, if already read (it is checked here all the same)."""
    path = Path(path)
    document = read_prefix_config(path, document)
    base = document["base_model"]
    ours = base_fingerprint(model)
    if base.get("fingerprint") != ours:
        raise PrefixTuneError(
            f"{path}: prefix was trained on base model {base.get('name')!r} (fingerprint {base.get('fingerprint')}), "
            f"but the loaded base model is {model.base_name!r} (fingerprint {ours})"
        )
    if document["geometry"] != model.geometry.to_dict():
        raise PrefixTuneError(f"{path}: prefix geometry {document['geometry']} != model {model.geometry.to_dict()}")
    tensors = read_prefix_tensors(path, document)
    try:
        config = PrefixConfig.from_dict({**document["prefix_config"], "reparameterize": False})
    except (TypeError, ValueError, PrefixTuneError) as e:
        raise PrefixTuneError(f"{path / CONFIG}: bad prefix_config ({e})") from None
    check_tensors(path, config, model.geometry, tensors)
    prefix = Prefix(config, model.geometry)
    with torch.no_grad():
        for part_name, part in prefix.parts.items():
            part.flat.copy_(tensors[part_name])
    return prefix


def check_tensors(path, config: PrefixConfig, geometry, tensors: dict[str, torch.Tensor]) -> None:
    """The tensors define the prefix: they must be exactly the parts the model needs, each of shape
    (P, *token shape) with P the config's length, floating point and finite. Checked before anything
    is allocated, so a config cannot make a small file into a large prefix."""
    where = Path(path) / WEIGHTS
    p = config.num_virtual_tokens
    wanted = {name: (p, *shape) for name, shape in token_shapes(config.mode, geometry).items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != wanted:
        raise PrefixTuneError(f"{where}: tensors {found} do not match the {p}-token prefix this model needs {wanted}")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise PrefixTuneError(f"{where}: tensor {name!r} is {t.dtype}, not floating point")
        if not torch.isfinite(t).all():
            raise PrefixTuneError(f"{where}: tensor {name!r} holds values that are not finite (NaN or inf)")
