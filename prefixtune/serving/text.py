"""Text around the engine: prompts formatted exactly as offline ``generate``, and streamed text."""

from __future__ import annotations

from ..features import Formatter, context_length
from ..options import cut_at_stop


def prompt_ids(model, tokenizer, prefix: str, text: str) -> list[int]:
    """The prompt ids for ``text`` with ``prefix``, as ``prefixtune generate`` builds them."""
    fmt = Formatter(
        tokenizer,
        model.geometry.is_encoder_decoder,
        context_length(model.base.config),
        model.get_prefix(prefix).num_tokens,
    )
    return fmt.source_ids(text, "inputs")


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
