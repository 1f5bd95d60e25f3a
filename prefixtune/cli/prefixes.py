"""``prefixtune export`` and ``prefixtune inspect``: prefix folders without training."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import cache_dir


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "export",
        help="eject the MLP: write a flat prefix folder from a run's last checkpoint",
        description="Write the prefix of a run's last checkpoint (or of a prefix folder) as an ejected prefix folder: "
        "the MLP reparameterization is replaced by the flat keys/values it produces.",
    )
    p.add_argument("run", help="run directory (uses checkpoints/checkpoint.pt when present) or prefix folder")
    p.add_argument("output", help="prefix folder to write")
    p.add_argument("--model", default=None, help="base model (default: the one the run used)")
    p.set_defaults(func=export)
    p = sub.add_parser(
        "inspect",
        help="show a prefix folder: config, parameters, size, base model",
        description="Show a saved prefix without loading any model.",
    )
    p.add_argument("path", help="prefix folder or run directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=inspect)


def export(args) -> int:
    from ..decode import export_run

    path = export_run(args.run, args.output, args.model, cache_dir())
    print(f"wrote {path}", file=sys.stderr)
    return 0


def inspect(args) -> int:
    from ..files import CONFIG, WEIGHTS, read_prefix_config, read_prefix_tensors

    path = Path(args.path)
    doc = read_prefix_config(path)
    tensors = read_prefix_tensors(path, doc)
    info = {
        "path": str(path),
        "base_model": doc["base_model"]["name"],
        "base_fingerprint": doc["base_model"]["fingerprint"],
        "model_type": doc["base_model"].get("model_type"),
        "mode": doc.get("mode"),
        "num_virtual_tokens": doc["num_virtual_tokens"],
        "parts": doc["parts"],
        "parameters": sum(t.numel() for t in tensors.values()),
        "file_bytes": (path / WEIGHTS).stat().st_size + (path / CONFIG).stat().st_size,
        "training": doc.get("training", {}),
    }
    if args.json:
        print(json.dumps(info))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0
