"""A cache layer that appends in place: decoding writes each step's keys and values into spare room.

transformers' ``DynamicLayer`` appends by ``torch.cat``, which copies the whole history at every layer
and every step: with 64 rows of ~100 positions on the default model that is about 0.3 GB of copying
per decoding step (appending in place made a 64-row step 1.09x faster on a 2-core CPU).
:class:`GrowingLayer` keeps each tensor in a buffer with room to grow along the sequence axis (a
quarter more than needed, at least :data:`SPARE` positions) and exposes ``keys``/``values`` as views
of the filled part, so the layer behaves exactly as a ``DynamicLayer`` to everything that reads or
assigns them (the values are the same numbers; attention reads the same keys).

Under autograd, when the new keys or the history need gradients, a step appends by concatenation as
``DynamicLayer`` does: writing into a buffer in place would invalidate the views an earlier step saved
for the backward pass.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

SPARE = 32  # positions of room added at least when a buffer grows


def _room(needed: int) -> int:
    return needed + max(needed // 4, SPARE)


def _holds(tensor: torch.Tensor | None) -> bool:
    """A (..., S, D) tensor, rather than nothing or transformers' 1-D empty placeholder."""
    return tensor is not None and tensor.dim() >= 2


class _Slot:
    """One growing tensor (keys or values): ``buffer[..., :length, :]`` is its content. A tensor assigned
    from outside is never written into: its room is its length, so the next append moves to a new buffer."""

    __slots__ = ("buffer", "length")

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.length = 0

    def view(self) -> torch.Tensor | None:
        return self.buffer[..., : self.length, :] if _holds(self.buffer) else self.buffer

    def assign(self, tensor: torch.Tensor | None) -> None:
        self.buffer = tensor
        self.length = tensor.shape[-2] if _holds(tensor) else 0

    def append(self, new: torch.Tensor) -> torch.Tensor:
        length, buffer = self.length, self.buffer if _holds(self.buffer) else None
        needed = length + new.shape[-2]
        if torch.is_grad_enabled() and (new.requires_grad or (buffer is not None and buffer.requires_grad)):
            self.assign(new if buffer is None else torch.cat([self.view(), new], dim=-2))
            return self.buffer
        # A buffer made under torch.inference_mode cannot be written outside it: such a step moves to a new one.
        frozen = buffer is not None and buffer.is_inference() and not torch.is_inference_mode_enabled()
        if buffer is None or buffer.shape[-2] < needed or frozen:
            grown = new.new_empty(*new.shape[:-2], _room(needed), new.shape[-1])
            if length:
                grown[..., :length, :] = buffer[..., :length, :]
            buffer = grown
        buffer[..., length:needed, :] = new
        self.buffer, self.length = buffer, needed
        return self.view()

    def select(self, index: torch.Tensor) -> None:
        """Keep (and repeat) rows ``index`` of the buffer, room included."""
        if _holds(self.buffer):
            self.buffer = self.buffer.index_select(0, index.to(self.buffer.device))


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``update`` writes into spare room instead of concatenating (see module doc)."""

    def __init__(self) -> None:
        self._k, self._v = _Slot(), _Slot()
        super().__init__()

    keys = property(lambda self: self._k.view(), lambda self, t: self._k.assign(t))
    values = property(lambda self: self._v.view(), lambda self, t: self._v.assign(t))

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
        return self._k.append(key_states), self._v.append(value_states)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self._k.select(beam_idx)
            self._v.select(beam_idx)

    batch_select_indices = reorder_cache
