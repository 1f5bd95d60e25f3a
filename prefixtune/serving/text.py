"""Text around the engine: prompts formatted exactly as offline ``generate``, and streamed text."""

from __future__ import annotations

import functools

from ..errors import PrefixTuneError
from ..features import Formatter, context_length
from ..options import cut_at_stop


def prompt_ids(model, tokenizer, prefix: str, text: str) -> list[int]:
    """The prompt ids for ``text`` with ``prefix``, as ``prefixtune generate`` builds them."""
    return _formatter(model, tokenizer, prefix).source_ids(text, "inputs")


def text_ids(model, tokenizer, prefix: str, text: str) -> list[int]:
    """``text``'s own tokens after ``prefix``, without the separator a prompt ends with (to score a text as is)."""
    return _formatter(model, tokenizer, prefix).fit(list(tokenizer(text, add_special_tokens=False)["input_ids"]))


def _formatter(model, tokenizer, prefix: str) -> Formatter:
    return Formatter(
        tokenizer,
        model.geometry.is_encoder_decoder,
        context_length(model.base.config),
        model.get_prefix(prefix).num_tokens,
    )


def chat_ids(model, tokenizer, prefix: str, messages: list[dict]) -> list[int]:
    """The prompt ids of a conversation: the tokenizer's chat template with the assistant's turn opened,
    after ``prefix`` (which the model holds as keys and values, not as text)."""
    if not getattr(tokenizer, "chat_template", None):
        raise PrefixTuneError("the base model's tokenizer has no chat template: use /v1/completions with plain text")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    fmt = _formatter(model, tokenizer, prefix)
    if model.geometry.is_encoder_decoder:
        return fmt.source_ids(text, "messages")
    return fmt.fit(list(tokenizer(text, add_special_tokens=False)["input_ids"]), "messages")


def token_text(tokenizer, token: int) -> str:
    """One token as text (special tokens as nothing, as in answers); a piece of a character shows as U+FFFD."""
    return tokenizer.decode([token], skip_special_tokens=True)


def token_bytes(tokenizer, token: int) -> list[int]:
    """One token's exact bytes: byte-level BPE tokens map back through GPT-2's byte alphabet, others
    through their text."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if token in getattr(tokenizer, "all_special_ids", ()):
        return []
    table = _byte_alphabet()
    if isinstance(piece, str) and piece and all(c in table for c in piece) and _byte_level(tokenizer):
        return [table[c] for c in piece]
    return list(token_text(tokenizer, token).encode("utf-8"))


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.decoder).__name__ == "ByteLevel"


class TextStream:
    """Turns a request's growing token list into text: final output, or deltas for streaming.

    Output stops before the first stop string. While streaming, the last characters that could
    still begin a stop string, incomplete UTF-8 characters and trailing whitespace are held back
    until known, so the streamed pieces add up to exactly the non-streamed output.
    """

    def __init__(self, tokenizer, stop: str | list[str] | None) -> None:
        self.tokenizer = tokenizer
        self.stop = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        self.sent = 0

    def _text(self, tokens: list[int]) -> str:
        return cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True).lstrip(), self.stop)

    def should_stop(self, tokens: list[int]) -> bool:
        return bool(self.stop) and any(s in self.tokenizer.decode(tokens, skip_special_tokens=True) for s in self.stop)

    def final(self, tokens: list[int]) -> str:
        return self._text(tokens).strip()

    def delta(self, tokens: list[int]) -> str:
        text = self._text(tokens)
        hold = max((len(s) for s in self.stop), default=1) - 1
        safe = text[: len(text) - hold] if hold else text
        safe = safe.rstrip("\ufffd").rstrip()  # incomplete characters, and whitespace that may end the output
        if len(safe) <= self.sent:
            return ""
        piece, self.sent = safe[self.sent :], len(safe)
        return piece

    def rest(self, tokens: list[int]) -> str:
        final = self.final(tokens)
        piece = final[self.sent :] if len(final) > self.sent else ""
        self.sent = max(self.sent, len(final))
        return piece
