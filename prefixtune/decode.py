"""Text in, text out: loading a saved prefix with its base model, and decoding batches of sources."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .base import DEFAULT_MODEL, load_base
from .checkpoint import CHECKPOINT, load_checkpoint
from .config import PrefixConfig
from .errors import PrefixTuneError
from .features import Formatter, context_length, left_pad
from .files import read_prefix_config
from .generation import seeded
from .model import PrefixTunedModel
from .options import GenerationOptions, cut_at_stop


def _base_for(name: str | None):
    return None if name in (None, DEFAULT_MODEL) else name


def load_for_inference(
    prefix_path, model_name: str | None = None, dtype: str = "fp32", device: str = "cpu", cache_dir: Path | None = None
):
    """Load the base model a prefix was trained on (or ``model_name``) and the prefix.

    Returns:
        (model, tokenizer, prefix name).
    """
    document = read_prefix_config(prefix_path)
    base_name = model_name or _base_for(document["base_model"]["name"])
    base, tokenizer = load_base(base_name, dtype=dtype, device=device, cache_dir=cache_dir)
    model = PrefixTunedModel(base, tokenizer)
    model.base_name = model_name or document["base_model"]["name"]
    name = "default"
    model.load_prefix(prefix_path, name=name)
    return model, tokenizer, name


def decode_texts(
    model: PrefixTunedModel,
    tokenizer,
    sources: list[str],
    prefix: str | list[str] | None = None,
    batch_size: int = 8,
    options: GenerationOptions | dict | None = None,
    truncate: bool = False,
    progress: bool = False,
) -> list[str]:
    """Generate one output text per source, in order; batches sources of similar length together.

    ``options`` (a :class:`GenerationOptions` or its fields as a dict): sampling draws from one
    generator seeded with ``options.seed`` (0 if unset); outputs are cut before any ``stop`` string.
    """
    if not isinstance(options, GenerationOptions):
        options = GenerationOptions.from_kwargs(**(options or {}))
    names = [prefix or model.active] * len(sources) if prefix is None or isinstance(prefix, str) else list(prefix)
    first = model.get_prefix(names[0] if names else None)
    fmt = Formatter(
        tokenizer, model.geometry.is_encoder_decoder, context_length(model.base.config), first.num_tokens, truncate
    )
    room = options.max_new_tokens
    prompts = [fmt.source_ids(s, f"source {i + 1}", target_room=room) for i, s in enumerate(sources)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fmt.eos
    options = options.replace(
        eos_token_id=fmt.eos if options.eos_token_id is None else options.eos_token_id,
        pad_token_id=pad_id if options.pad_token_id is None else options.pad_token_id,
    )
    generator = seeded(options.seed, model.device)
    outputs: list[str] = [""] * len(sources)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sources), desc="generate", unit="input", dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], pad_id)
        out = model.generate(
            ids.to(model.device),
            mask.to(model.device),
            prefix=[names[i] for i in chunk],
            generator=generator,
            options=options,
        )
        skip = 1 if model.geometry.is_encoder_decoder else ids.shape[1]
        for row, i in enumerate(chunk):
            text = tokenizer.decode(out[row, skip:].tolist(), skip_special_tokens=True).strip()
            outputs[i] = cut_at_stop(text, options.stop).strip()
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return outputs


def export_run(run, output, model_name: str | None = None, cache_dir: Path | None = None) -> Path:
    """Write an ejected prefix folder from a run's last checkpoint, or re-save a prefix folder."""
    run, output = Path(run), Path(output)
    state = load_checkpoint(run) if (run / CHECKPOINT).is_file() else None
    if state is None:
        model, _, name = load_for_inference(run, model_name, cache_dir=cache_dir)
        model.save_prefix(output, name=name)
        return output
    config_file = run / "train_config.json"
    if not config_file.is_file():
        raise PrefixTuneError(f"{config_file}: missing; cannot tell which model and prefix the checkpoint belongs to")
    train_config = json.loads(config_file.read_text())
    prefix_fields = {f.name for f in dataclasses.fields(PrefixConfig)}
    prefix_config = PrefixConfig(**{k: v for k, v in train_config["prefix"].items() if k in prefix_fields})
    base, tokenizer = load_base(model_name or train_config.get("model"), dtype="fp32", cache_dir=cache_dir)
    tokens = state["prefix"][next(k for k in state["prefix"] if k.endswith(("embedding", "flat")))].shape[0]
    prefix_config.num_virtual_tokens, prefix_config.init_text = tokens, None
    model = PrefixTunedModel.wrap(base, prefix_config, tokenizer)
    if train_config.get("model"):
        model.base_name = train_config["model"]
    model.get_prefix("default").load_state_dict(state["prefix"])
    model.eject_mlp("default")
    model.save_prefix(output, name="default", metadata={"steps": state["step"], "exported_from": str(run)})
    return output
