"""``export``, ``inspect``, ``import-peft`` and ``export-peft``: prefix folders without training."""

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
    p = sub.add_parser(
        "import-peft",
        help="convert a PEFT PREFIX_TUNING checkpoint into a prefix folder",
        description="Convert a PEFT prefix-tuning checkpoint (adapter_config.json + adapter_model.safetensors) of a "
        "decoder-only model into a prefixtune prefix folder. Loads the base model to record its fingerprint.",
    )
    p.add_argument("peft_dir", metavar="DIR", help="PEFT checkpoint folder")
    p.add_argument("output", metavar="OUT", help="prefix folder to write")
    p.add_argument(
        "--model", default=None, help="base model (default: the checkpoint's base_model_name_or_path, else the default)"
    )
    p.set_defaults(func=import_peft)
    p = sub.add_parser(
        "export-peft",
        help="convert a prefix folder into a PEFT PREFIX_TUNING checkpoint",
        description="Write a decoder-only prefix folder as a PEFT prefix-tuning checkpoint that "
        "PeftModel.from_pretrained loads. Encoder-decoder and embedding-mode prefixes have no PEFT equivalent.",
    )
    p.add_argument("prefix", metavar="PREFIX", help="prefix folder")
    p.add_argument("output", metavar="OUT", help="PEFT checkpoint folder to write")
    p.add_argument(
        "--base-model-name", default=None, help="base_model_name_or_path to record (default: the prefix's base model)"
    )
    p.set_defaults(func=export_peft)


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


def import_peft(args) -> int:
    from ..base import load_base
    from ..interop import import_peft as convert
    from ..interop import read_peft
    from ..model import PrefixTunedModel

    config, _ = read_peft(args.peft_dir)  # check the checkpoint before loading any model
    name = args.model or config.get("base_model_name_or_path")
    base, tokenizer = load_base(name, cache_dir=cache_dir())
    model = PrefixTunedModel(base, tokenizer)
    if name:
        model.base_name = name
    convert(model, args.peft_dir)
    model.save_prefix(args.output, metadata={"imported_from": str(Path(args.peft_dir).resolve())})
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def export_peft(args) -> int:
    from ..interop import export_peft as convert

    path = convert(args.prefix, args.output, args.base_model_name)
    print(f"wrote {path}", file=sys.stderr)
    return 0
