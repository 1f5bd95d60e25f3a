"""Tiny seeded models built from configs in-process (no downloads), one per supported family."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BartConfig,
    GPT2Config,
    LlamaConfig,
    T5Config,
)

VOCAB = 96


def _common():
    return dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)


CONFIGS = {
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **_common()),
    "llama": lambda: LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **_common(),
    ),
    "bart": lambda: BartConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=512,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
        **_common(),
    ),
    "t5": lambda: T5Config(
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        decoder_start_token_id=0,
        vocab_size=VOCAB,
        pad_token_id=0,
        eos_token_id=2,
    ),
}
DECODER_ONLY = ("gpt2", "llama")
ENCODER_DECODER = ("bart", "t5")
ALL = DECODER_ONLY + ENCODER_DECODER


def tiny_model(family: str, seed: int = 0, attn: str = "sdpa"):
    """A randomly initialized tiny model of ``family``, in eval mode, fp32."""
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=attn if family != "t5" else "eager")
    return model.eval()


class TinyTokenizer:
    """Maps characters to ids 3..95; enough for init_text and data tests."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    eos_token = "</s>"

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = [3 + (ord(c) % (VOCAB - 3)) for c in text]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i >= 3)


def tiny_tokenizer(vocab_size: int = 320):
    """A real (fast, byte-level BPE) Hugging Face tokenizer trained in-process on a few sentences."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "name : The Vaults | eatType : pub | priceRange : more than £30 | near : Café Adriatic",
        "The Vaults pub near Café Adriatic has a 5 star rating. Prices start at £30.",
        "table-to-text: food : English | area : riverside | familyFriendly : yes | customer rating : low",
    ] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def save_tiny_model_dir(path, family: str = "llama", seed: int = 0):
    """Write a tiny model + tokenizer folder usable as ``--model PATH``; returns the path as str."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config.vocab_size = len(tok)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    auto.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_model(seed: int = 0, family: str = "llama"):
    """A tiny model with a real tokenizer, wrapped (no prefixes yet): (PrefixTunedModel, tokenizer)."""
    from prefixtune import PrefixTunedModel

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = CONFIGS[family]()
    config.vocab_size = len(tok)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return PrefixTunedModel(auto.from_config(config).eval(), tok), tok
