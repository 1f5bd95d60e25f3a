"""A frozen Hugging Face model with any number of named prefixes (Li & Liang 2021, §4).

The base model is frozen and never receives gradients. Each batch row may use a different prefix
(mixed batch, §8: one model serving many tasks). Shapes: B batch, T input length, P prefix length,
L layers, H key/value heads, D head dim, d hidden size, V vocabulary.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from contextlib import contextmanager

import torch
from torch import nn

from . import injection, support
from .config import PrefixConfig
from .errors import PrefixTuneError
from .geometry import read_geometry
from .layout import AttentionLayout
from .outputs import PrefixLMOutput, causal_loss, seq2seq_loss
from .prefix import Prefix
from .state import PrefixedState, decoder_start, new_cache, read_prefix

NAME_CHARS = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"  # a prefix name (the server's schema: ^...$)
_NAME = re.compile(NAME_CHARS)  # whole name: fullmatch (a "$" would allow a final newline)


def check_prefix_name(name: str) -> str:
    """A prefix name is also a folder name: letters, digits, ``_ - .``, no ``..``, no paths."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise PrefixTuneError(f"invalid prefix name {name!r}: use letters, digits, '_', '-', '.' (no paths)")
    return name


# Encoder-decoder families whose decoder positions are relative (so left-padded prefixes of
# different lengths keep every row's positions). Others use absolute decoder positions.
_RELATIVE_DECODER_POSITIONS = {"t5", "mt5", "umt5", "longt5", "switch_transformers"}
DEFAULT_NUM_VIRTUAL_TOKENS = 10


class PrefixTunedModel(nn.Module):
    """A frozen base model plus named, trainable prefixes.

    Use :meth:`wrap` to freeze a model and add its first prefix.
    """

    def __init__(self, base: nn.Module, tokenizer=None) -> None:
        super().__init__()
        self.geometry = read_geometry(base.config)
        for p in base.parameters():
            p.requires_grad_(False)
        base.eval()
        self.base = base
        self.tokenizer = tokenizer
        self._prefixes = nn.ModuleDict()  # name -> Prefix; only through the methods below
        self.active: str | None = None
        self.base_fingerprint: str | None = None
        self.base_name: str = getattr(base.config, "_name_or_path", "") or base.config.model_type
        self._logits_to_keep = "logits_to_keep" in inspect.signature(base.forward).parameters
        # Models that slice with transformers' helper accept a boolean (B, T) mask: LM head on targets only.
        self._target_logits = self._logits_to_keep and "slice_logits_to_keep" in inspect.getsource(type(base).forward)
        self._encoder_hooks = None
        self.decoder_positions: injection.DecoderPositions | None = None  # per-row decoder positions (BART family)
        self.layout = AttentionLayout.read(base.config)
        self.decode_weights = "auto"  # prompts and decoding steps: auto, packed, plain or off (prefixtune.lean)
        injection.contiguous_head(base)
        if self.geometry.is_encoder_decoder:
            if not self.layout.plain:
                raise PrefixTuneError(
                    "encoder-decoder models with sliding-window or chunked attention are not supported"
                )
            enc = self.geometry.stack("encoder")
            modules = injection.find_encoder_attention(base.get_encoder(), enc.num_layers)
            self._encoder_hooks = injection.EncoderPrefixHooks(modules, base.get_encoder())
            self.decoder_positions = injection.DecoderPositions.find(base.get_decoder())
        else:
            self.layout.check_implementation(base.config)
            self.geometry = support.geometry_from_cache(self)
            support.self_check(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def wrap(
        cls, base_model: nn.Module, config: PrefixConfig, tokenizer=None, name: str = "default"
    ) -> PrefixTunedModel:
        """Freeze ``base_model`` and add one trainable prefix named ``name``."""
        model = cls(base_model, tokenizer)
        model.add_prefix(name, config, tokenizer)
        return model

    def train(self, mode: bool = True) -> PrefixTunedModel:
        """Train mode for the prefixes only; the frozen base stays in eval mode (no dropout)."""
        super().train(mode)
        self.base.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.base.parameters()).dtype

    def add_prefix(self, name: str, config: PrefixConfig, tokenizer=None) -> Prefix:
        """Add a trainable prefix, randomly or from ``config.init_text`` (needs a tokenizer)."""
        check_prefix_name(name)
        config = copy.deepcopy(config)
        ids = None
        if config.init_text is not None:
            tokenizer = tokenizer or self.tokenizer
            if tokenizer is None:
                raise PrefixTuneError("init_text needs a tokenizer: pass tokenizer=...")
            ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
            if config.num_virtual_tokens is None:
                config.num_virtual_tokens = len(ids)
            elif config.num_virtual_tokens != len(ids):
                raise PrefixTuneError(
                    f"init_text {config.init_text!r} is {len(ids)} tokens but num_virtual_tokens="
                    f"{config.num_virtual_tokens}; leave num_virtual_tokens unset to use the text's length"
                )
        elif config.num_virtual_tokens is None:
            config.num_virtual_tokens = DEFAULT_NUM_VIRTUAL_TOKENS
        prefix = Prefix(config, self.geometry).to(self.device)
        if ids is not None:
            targets = self._activations(torch.tensor([ids], device=self.device), config.mode)
            for part_name, part in prefix.parts.items():
                part.fit(targets[part_name].float())
        return self.put_prefix(name, prefix)

    # ------------------------------------------------------------------ the set of prefixes
    def put_prefix(self, name: str, prefix: Prefix) -> Prefix:
        """Hold a built prefix as ``name``, replacing one of that name; the first becomes active."""
        check_prefix_name(name)
        self._prefixes[name] = prefix.to(self.device)  # replaced in place: never missing to another thread
        if self.active is None:
            self.active = name
        return prefix

    def remove_prefix(self, name: str) -> None:
        """Drop prefix ``name`` (an error if there is none); another becomes active if it was."""
        self.get_prefix(name)
        del self._prefixes[name]
        if self.active == name:
            self.active = next(iter(self._prefixes), None)

    def get_prefix(self, name: str | None = None) -> Prefix:
        """Prefix ``name`` (default: the active one); an error naming the loaded ones if unknown."""
        name = name or self.active
        if name not in self._prefixes:
            known = ", ".join(self._prefixes) or "none"
            raise PrefixTuneError(f"unknown prefix {name!r} (loaded: {known})")
        return self._prefixes[name]

    def has_prefix(self, name: str) -> bool:
        return name in self._prefixes

    def prefix_names(self) -> list[str]:
        """The names of the prefixes held, in the order they were added."""
        return list(self._prefixes)

    def resident_bytes(self, name: str | None = None) -> int:
        """Memory held by prefix ``name``'s tensors (parameters and buffers), or by all prefixes if None."""
        modules = [self.get_prefix(name)] if name is not None else list(self._prefixes.values())
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The prefix parameters that require grad (never a base parameter)."""
        return [p for p in self._prefixes.parameters() if p.requires_grad]

    def eject_mlp(self, name: str | None = None) -> None:
        """Eject the MLP of prefix ``name``: keep only the flat tensors it produces (§4.3); outputs are unchanged."""
        self.get_prefix(name).eject()

    def export(self, name: str | None = None) -> None:
        """Deprecated: the old name of :meth:`eject_mlp`."""
        warnings.warn("PrefixTunedModel.export() is renamed eject_mlp()", DeprecationWarning, stacklevel=2)
        self.eject_mlp(name)

    def save_prefix(self, path, name: str | None = None, metadata: dict | None = None) -> None:
        """Save prefix ``name`` (ejected) as a folder: prefix.safetensors + prefix_config.json."""
        from .files import save_prefix

        save_prefix(self, path, name or self.active, metadata)

    def load_prefix(self, path, name: str | None = None) -> Prefix:
        """Load a saved prefix folder as ``name`` (default: the folder's name)."""
        from .files import load_prefix

        return load_prefix(self, path, name)

    @torch.no_grad()
    def _activations(self, ids: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
        """The frozen model's own prefix-shaped activations of ``ids`` (1, P), for init_text (§7.2)."""
        if mode == "embedding":
            return {"embedding": self.base.get_input_embeddings()(ids)[0]}  # (P, d)
        decoder = self.geometry.stack("decoder")
        if not self.geometry.is_encoder_decoder:
            cache = self.base(input_ids=ids, cache=new_cache(self), use_cache=True).cache
            return {"decoder": read_prefix(cache, decoder, self.layout)}
        empty = self.batch_prefix(None, 1, empty=True)
        captured = []
        with self._encoder_hooks.active(empty["encoder"].layers, record=captured):
            hidden = self.base.get_encoder()(input_ids=ids).last_hidden_state
        state = PrefixedState.seq2seq(self, empty, hidden, torch.ones_like(ids))
        state.run_decoder(ids, torch.ones_like(ids))
        return {
            "decoder": read_prefix(state.cache.self_attention_cache, decoder),
            "cross": read_prefix(state.cache.cross_attention_cache, self.geometry.stack("cross")),
            "encoder": self.geometry.stack("encoder").join([(k[0], v[0]) for k, v in captured]),
        }

    # ------------------------------------------------------------------ prefixes of a batch
    def row_names(self, prefix: str | list[str] | None, batch: int) -> list[str]:
        """One prefix name per row from a name, a list of names, or None (the active prefix)."""
        if prefix is None or isinstance(prefix, str):
            names = [prefix or self.active] * batch
        else:
            names = list(prefix)
            if len(names) != batch:
                raise PrefixTuneError(f"prefix list has {len(names)} names for a batch of {batch} rows")
        for n in set(names):
            self.get_prefix(n)
        modes = {self._prefixes[n].mode for n in names}
        if len(modes) > 1:
            raise PrefixTuneError("a batch cannot mix 'kv' and 'embedding' prefixes")
        return names

    def batch_prefix(self, prefix, batch: int, empty: bool = False) -> dict[str, injection.StackPrefix | torch.Tensor]:
        """The per-row prefix of every stack for a batch.

        Returns:
            For kv prefixes: stack name → :class:`injection.StackPrefix`. For embedding prefixes on
            an encoder-decoder model: ``{"embedding": (B, P, d), "embedding_mask": (B, P)}``.
        """
        if empty:  # zero-length prefixes, used to read activations
            out = {}
            for s in self.geometry.stacks:
                layers = [
                    tuple(torch.zeros(batch, h, 0, d, device=self.device, dtype=self.dtype) for d in (dk, dv))
                    for h, dk, dv in s.layer_shapes()
                ]
                out[s.name] = injection.StackPrefix(layers, torch.zeros(batch, 0, dtype=torch.long, device=self.device))
            return out
        names = self.row_names(prefix, batch)
        unique = list(dict.fromkeys(names))
        tensors = {n: self._prefixes[n]() for n in unique}  # name → part → (P, ...)
        if self._prefixes[unique[0]].mode == "embedding":
            if not self.geometry.is_encoder_decoder:
                tensors = {n: {"decoder": self._embedding_kv(t["embedding"])} for n, t in tensors.items()}
            else:
                rows, mask = injection.gather_rows({n: t["embedding"] for n, t in tensors.items()}, names)
                return {"embedding": rows.to(self.dtype), "embedding_mask": mask}
        out = {}
        for stack in self.geometry.stacks:
            rows, mask = injection.gather_rows({n: t[stack.name] for n, t in tensors.items()}, names)
            out[stack.name] = injection.StackPrefix(stack.split(rows.to(self.dtype)), mask)
        if not self.mixes_prefix_lengths:
            lengths = {self._prefixes[n].num_tokens for n in unique}
            if len(lengths) > 1:
                raise PrefixTuneError(
                    f"{self.geometry.model_type} does not take positions per row: prefixes of different lengths "
                    f"({sorted(lengths)}) cannot share a batch; batch them by length"
                )
        return out

    def _embedding_kv(self, embeds: torch.Tensor) -> torch.Tensor:
        """Keys/values of P trained input embeddings at positions 0..P-1: (P, d) → (P, L, 2, H, D)."""
        cache = self.base(inputs_embeds=embeds[None].to(self.dtype), cache=new_cache(self), use_cache=True).cache
        return read_prefix(cache, self.geometry.stack("decoder"), self.layout)

    @property
    def mixes_prefix_lengths(self) -> bool:
        """Whether rows with prefixes (and decoder histories) of different lengths can share a batch: always
        for decoder-only models (the self-check at wrap refuses those that cannot); for encoder-decoder
        ones whose decoder positions are relative (T5) or can be set per row (the BART family).
        Continuous batching in the server needs it."""
        return (
            not self.geometry.is_encoder_decoder
            or self.geometry.model_type in _RELATIVE_DECODER_POSITIONS
            or self.decoder_positions is not None
        )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        prefix: str | list[str] | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool = False,
        loss_only: bool = False,
        **kwargs,
    ) -> PrefixLMOutput:
        """Run the model with each row's prefix.

        Args:
            input_ids: (B, T) token ids (the source, for encoder-decoder models).
            attention_mask: (B, T) 1 for real tokens; padding may sit on either side.
            labels: (B, T) targets with -100 where no loss is taken (decoder-only: aligned with
                input_ids; encoder-decoder: the decoder targets, (B, T_dec)).
            prefix: A prefix name, one name per row, or None for the active prefix.
            decoder_input_ids: (B, T_dec) decoder inputs; derived from labels when omitted.
            decoder_attention_mask: (B, T_dec).
            use_cache: Return the cache for further decoding.
            loss_only: With labels, compute logits only where a target is predicted (training): the
                LM head skips source and padding positions, and ``logits`` is (N_targets, V).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = self.batch_prefix(prefix, input_ids.shape[0])
        if self.geometry.is_encoder_decoder:
            return self._forward_seq2seq(
                input_ids, attention_mask, labels, batch, decoder_input_ids, decoder_attention_mask, use_cache, **kwargs
            )
        if loss_only and labels is not None and self._target_logits:
            predict = torch.zeros_like(labels, dtype=torch.bool)  # (B, T): positions whose next token is a target
            predict[:, :-1] = labels[:, 1:] != -100
            state = PrefixedState.causal(self, batch["decoder"], keep=use_cache)
            out = self.run_causal(input_ids, attention_mask, state, logits_to_keep=predict, **kwargs)
            targets = labels[:, 1:][predict[:, :-1]]  # (N,)
            loss = nn.functional.cross_entropy(out.logits.float().reshape(len(targets), -1), targets)
            return PrefixLMOutput(loss, out.logits, int(targets.numel()), out.cache if use_cache else None)
        state = PrefixedState.causal(self, batch["decoder"], keep=use_cache)
        out = self.run_causal(input_ids, attention_mask, state, **kwargs)
        loss, count = causal_loss(out.logits, labels) if labels is not None else (None, 0)
        return PrefixLMOutput(loss, out.logits, count, out.cache if use_cache else None)

    def run_causal(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: PrefixedState, **kwargs):
        """One pass of a decoder-only base over (B, T) inputs after what ``state`` holds.

        A state made with ``keep=False`` (training) only presents the prefix and stores nothing,
        which also makes the pass safe under gradient checkpointing. ``use_cache`` is on (the prefix travels
        in the cache, and some models, Whisper's decoder, drop a cache given without it) except for training
        passes of hybrids, whose recurrent layers would otherwise store a state that a recomputation reads.
        """
        if "logits_to_keep" in kwargs and not self._logits_to_keep:
            kwargs.pop("logits_to_keep")
        keep = state.keeps
        queries = torch.zeros(*input_ids.shape, 1, device=self.device, dtype=self.dtype)  # shape only: (B, T, 1)
        with self._checkpointing_layers(not keep):
            return self.base(
                input_ids=input_ids,
                use_cache=keep or not self.layout.recurrent,
                **state.causal_inputs(attention_mask, queries),
                **kwargs,
            )

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer in the backward pass instead of storing its activations.

        Works with the prefix (decoder-only models): training passes use a side-effect-free
        prefix cache, so the recomputed layer sees exactly the same keys and values.
        """
        if self.geometry.is_encoder_decoder:
            raise PrefixTuneError("gradient checkpointing with a prefix is supported for decoder-only models")
        if hasattr(self.base, "activation_checkpointing_enable"):  # transformers ≥ 5.2x name
            self.base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._checkpointed = [
            m
            for m in self.base.modules()
            if getattr(m, "gradient_checkpointing", False) and hasattr(type(m), "_can_checkpoint_with_cache")
        ]
        for layer in self._checkpointed:
            layer._can_checkpoint_with_cache = True  # our training cache is read-only

    @contextmanager
    def _checkpointing_layers(self, active: bool):
        """The frozen base stays in eval mode (no dropout); only the layers' own flag says "training",
        which is what makes transformers checkpoint them."""
        layers = getattr(self, "_checkpointed", []) if active and self.training else []
        for layer in layers:
            layer.training = True
        try:
            yield
        finally:
            for layer in layers:
                layer.training = False

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder with its prefix.

        Returns:
            The encoder states (B, S', d) and the key mask cross-attention uses (B, P_cross + S').
        """
        encoder = self.base.get_encoder()
        # Real source tokens first, padding last: encoder positions after the prefix are the same as alone.
        order = torch.sort(1 - attention_mask.long(), dim=1, stable=True).indices  # (B, S)
        input_ids, attention_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
        if "embedding" in batch:  # prompt tuning: trained embeddings before the input
            embeds = torch.cat([batch["embedding"], encoder.get_input_embeddings()(input_ids)], dim=1)  # (B, P+S, d)
            mask = torch.cat([batch["embedding_mask"], attention_mask.long()], dim=1)  # (B, P+S)
            # Each row's own embeddings and tokens first, padding last: absolute positions as alone.
            order = torch.sort(1 - mask, dim=1, stable=True).indices
            embeds = embeds.gather(1, order[..., None].expand_as(embeds))
            mask = mask.gather(1, order)
            return encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask
        enc = batch["encoder"]
        queries = torch.zeros(*input_ids.shape, 1, device=self.device, dtype=self.dtype)  # shape only: (B, S, 1)
        mask = self._encoder_hooks.mask(self.base.config, queries, torch.cat([enc.mask, attention_mask.long()], 1))
        with self._encoder_hooks.active(enc.layers):
            hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, S, d)
        return hidden, torch.cat([batch["cross"].mask, attention_mask.long()], dim=1)

    def _forward_seq2seq(
        self, input_ids, attention_mask, labels, batch, decoder_input_ids, decoder_attention_mask, use_cache, **kwargs
    ):
        if decoder_input_ids is None:
            if labels is None:
                raise PrefixTuneError("encoder-decoder forward needs labels or decoder_input_ids")
            decoder_input_ids = self._decoder_inputs_from(labels)
        if decoder_attention_mask is None:
            decoder_attention_mask = torch.ones_like(decoder_input_ids)
        hidden, key_mask = self.encode(input_ids, attention_mask, batch)
        state = PrefixedState.seq2seq(self, batch, hidden, key_mask)
        out = state.run_decoder(decoder_input_ids, decoder_attention_mask, **kwargs)
        loss, count = seq2seq_loss(out.logits, labels) if labels is not None else (None, 0)
        return PrefixLMOutput(loss, out.logits, count, state.cache if use_cache else None)

    def _decoder_inputs_from(self, labels: torch.Tensor) -> torch.Tensor:
        """The decoder inputs for ``labels``: the model's own rule, else labels shifted right after the start token."""
        if hasattr(self.base, "prepare_decoder_input_ids_from_labels"):
            return self.base.prepare_decoder_input_ids_from_labels(labels=labels)
        pad = getattr(self.base.config, "pad_token_id", None) or 0
        shifted = torch.full_like(labels, decoder_start(self.base))
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, pad)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, prefix=None, **generation_kwargs
    ) -> torch.Tensor:
        """Generate token ids as Hugging Face ``generate`` returns them.

        Decoder-only: (B, T + N), the (left-padded) input then new tokens; encoder-decoder: (B, 1 + N), the
        decoder start token then new tokens. Options: :func:`prefixtune.generation.generate`.
        """
        from .generation import generate

        return generate(self, input_ids, attention_mask, prefix, **generation_kwargs)
