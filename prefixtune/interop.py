"""Moving prefixes between PEFT (``PREFIX_TUNING``) and prefixtune.

A PEFT prefix-tuning checkpoint is ``adapter_config.json`` + ``adapter_model.safetensors`` (or
``.bin``) holding one tensor, ``prompt_embeddings`` (P, L · 2 · kv_heads · D): the prefix already
projected through PEFT's MLP when ``prefix_projection`` was on. PEFT lays each virtual token out as
(layer, key/value, kv head, head dim), which is exactly prefixtune's flat decoder part
(P, L, 2, kv_heads, D); both put the prefix at positions 0..P-1 and the input after it. So a
decoder-only prefix converts both ways by a reshape, and the logits are identical.

Not convertible:
- encoder-decoder prefixes: PEFT's ``SEQ_2_SEQ_LM`` prefix has no encoder part and reuses one
  tensor for decoder self-attention and cross-attention; prefixtune trains three independent parts
  (encoder, decoder, cross);
- prefixtune ``embedding``-mode prefixes (on the input embeddings; PEFT calls that prompt tuning);
- PEFT's MLP weights themselves: PEFT saves only the projected prefix, as prefixtune does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import PrefixTuneError
from .files import CONFIG, atomic_write, read_json, read_prefix_config, read_prefix_tensors, write_json

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_WEIGHTS_BIN = "adapter_model.bin"
PEFT_KEY = "prompt_embeddings"
PEFT_VERSION = "0.21.2"  # the PEFT version these files are written for and tested against


def read_peft(path) -> tuple[dict, torch.Tensor]:
    """Read and check a PEFT prefix-tuning checkpoint folder.

    Returns:
        (adapter config, ``prompt_embeddings`` (P, L · 2 · kv_heads · D) in fp32).
    """
    path = Path(path)
    file = path / PEFT_CONFIG
    if not file.is_file():
        raise PrefixTuneError(f"{file}: missing; not a PEFT checkpoint folder")
    config = read_json(file)
    if not isinstance(config, dict):
        raise PrefixTuneError(f"{file}: not a JSON object")
    if config.get("peft_type") != "PREFIX_TUNING":
        raise PrefixTuneError(f"{file}: peft_type is {config.get('peft_type')!r}; only 'PREFIX_TUNING' converts")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise PrefixTuneError(
            f"{file}: task_type {config.get('task_type')!r} is not convertible; only CAUSAL_LM (decoder-only) "
            "prefixes are (PEFT's encoder-decoder prefixes have no encoder part and share one tensor between "
            "self- and cross-attention)"
        )
    for field in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"):
        if not isinstance(config.get(field), int):
            raise PrefixTuneError(f"{file}: field {field!r} is missing or not an integer")
    if config.get("num_transformer_submodules", 1) != 1:
        raise PrefixTuneError(f"{file}: num_transformer_submodules must be 1 for a decoder-only prefix")
    weights = _read_peft_weights(path)
    expected = (config["num_virtual_tokens"], config["num_layers"] * 2 * config["token_dim"])
    if tuple(weights.shape) != expected:
        raise PrefixTuneError(
            f"{path}: {PEFT_KEY} has shape {tuple(weights.shape)}, but {PEFT_CONFIG} implies {expected}"
        )
    return config, weights.float()


def _read_peft_weights(path: Path) -> torch.Tensor:
    file = path / PEFT_WEIGHTS
    if file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise PrefixTuneError(f"{file}: corrupted or truncated safetensors file ({e})") from None
    elif (path / PEFT_WEIGHTS_BIN).is_file():
        file = path / PEFT_WEIGHTS_BIN
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise PrefixTuneError(f"{file}: unreadable ({e})") from None
    else:
        raise PrefixTuneError(f"{path}: no {PEFT_WEIGHTS} or {PEFT_WEIGHTS_BIN}")
    if PEFT_KEY not in tensors:
        raise PrefixTuneError(f"{file}: no {PEFT_KEY!r} tensor (found {sorted(tensors)})")
    return tensors[PEFT_KEY]


def import_peft(model, path, name: str = "default"):
    """Add the prefix of PEFT checkpoint ``path`` to ``model`` (a decoder-only PrefixTunedModel) as ``name``.

    Returns:
        The new :class:`prefixtune.prefix.Prefix` (flat, not trainable through an MLP).
    """
    from .config import PrefixConfig

    config, weights = read_peft(path)
    if model.geometry.is_encoder_decoder:
        raise PrefixTuneError(f"{path}: the base model is encoder-decoder; only decoder-only prefixes convert")
    stack = model.geometry.stack("decoder")  # (L, 2, kv_heads, D)
    if stack.v_dim != stack.head_dim or stack.per_layer is not None:
        raise PrefixTuneError(
            f"{path}: PEFT prefixes hold keys and values of one width and one shape for every layer; "
            "this model's differ"
        )
    found = (config["num_layers"], config["num_attention_heads"], config["token_dim"])
    wanted = (stack.num_layers, stack.num_kv_heads, stack.kv_dim)
    if found != wanted:
        raise PrefixTuneError(
            f"{Path(path) / PEFT_CONFIG}: (num_layers, num_attention_heads, token_dim) = {found} does not match the "
            f"base model's (layers, kv heads, kv heads × head dim) = {wanted}; was it trained on another model?"
        )
    prefix = model.add_prefix(name, PrefixConfig(num_virtual_tokens=config["num_virtual_tokens"], reparameterize=False))
    flat = weights.view(config["num_virtual_tokens"], *stack.token_shape)
    prefix.parts["decoder"].fit(flat.to(device=model.device))
    return prefix


def export_peft(prefix_path, output, base_model_name: str | None = None) -> Path:
    """Write prefix folder ``prefix_path`` as a PEFT ``PREFIX_TUNING`` checkpoint folder (no model needed)."""
    from safetensors.torch import save_file

    prefix_path, output = Path(prefix_path), Path(output)
    document = read_prefix_config(prefix_path)
    where = prefix_path / CONFIG
    if document["geometry"].get("is_encoder_decoder"):
        raise PrefixTuneError(
            f"{where}: encoder-decoder prefixes (encoder, decoder and cross-attention parts) have no PEFT "
            "equivalent; only decoder-only prefixes convert"
        )
    if document.get("mode", "kv") != "kv":
        raise PrefixTuneError(f"{where}: mode {document.get('mode')!r} prefixes have no PEFT prefix-tuning equivalent")
    tensors = read_prefix_tensors(prefix_path, document)
    flat = tensors["decoder"]  # (P, L, 2, kv_heads, D)
    if flat.dim() != 5:
        raise PrefixTuneError(
            f"{where}: keys and values of different widths (multi-head latent attention), or layers of different "
            "shapes, have no PEFT equivalent"
        )
    p, layers, _, heads, head_dim = flat.shape
    name = base_model_name or document["base_model"].get("name")
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "peft_version": PEFT_VERSION,
        "base_model_name_or_path": name,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": p,
        "num_layers": layers,
        "num_attention_heads": heads,
        "token_dim": heads * head_dim,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": heads * head_dim,
        "prefix_projection": False,
        "init_weights": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }
    weights = {PEFT_KEY: flat.reshape(p, -1).contiguous()}
    atomic_write(output / PEFT_WEIGHTS, lambda f: save_file(weights, str(f), metadata={"format": "pt"}))
    write_json(output / PEFT_CONFIG, config)
    return output
