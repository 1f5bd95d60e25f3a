"""Passes of Llama-family models over new tokens after the cache, written out once over their own weights.

A one-token step through transformers' modules runs about 1,000 tensor operations on the default model
(30 layers): module calls, mask building, cache bookkeeping. On a 2-core CPU that overhead was about
20 ms of a 45 ms batch-1 step whose weight reads take about 25 ms. :class:`LeanStep` computes the same
pass — embedding, per layer RMSNorm → q/k/v → rotary → attention over the cache → output → RMSNorm →
SiLU-gated MLP, final norm, output layer on the last position — in about 20 operations per layer, for
one decoding step or a whole prompt (or a chunk of one):

- q, k and v come from one product with the three matrices stacked, gate and up likewise;
- rotary embeddings are computed once per pass for all layers, and applied to q and k together;
- attention is one ``scaled_dot_product_attention`` with each key head's query heads (and positions) as
  one sequence, as transformers does for one-token steps, and the mask built once per pass (none for a
  one-token step where no key is padding).

Products of more than one row (rows × new tokens) go through oneDNN's blocked copy of each weight
(``packed`` weights). With 2 threads here, PyTorch's plain fp32 product of 4 to 50 rows with a 576-wide
weight runs 1.5-4x slower than with the blocked copy, which is made once instead of at every call; one
row keeps the plain weight, where it is as fast. The copies cost memory: the stacked q/k/v and gate/up
matrices plus a blocked copy of every matrix, about 1.5x the model's weights, so they are made only
where that fits (see :func:`weights_mode`); otherwise the pass runs on the model's own weights.

Which models: decoder-only ``llama``, ``mistral`` and ``qwen2`` models (whose layers are exactly Llama's,
Qwen2's with q/k/v biases) where every layer is full attention, in eval mode, without autograd, hooks
or a replaced ``forward``. Other models, and training and scoring passes, keep transformers' forward.
Tests compare the passes with that forward on each family.
"""

from __future__ import annotations

import os
import weakref

import torch
import torch.nn.functional as F

from .errors import PrefixTuneError

FAMILIES = ("llama", "mistral", "qwen2")
MODES = ("auto", "packed", "plain", "off")
PACK_ROWS = 64  # the row count oneDNN chooses the blocked layout for (any row count runs on it)
MEMORY_SHARE = 0.25  # "auto" packs where the copies take at most this share of the machine's memory


# Each model's step, beside the model rather than in it: copying or pickling a model leaves its step behind
# (the blocked copies are opaque tensors that neither copies nor saves).
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a (N, K) weight, or None where this build or device has none."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    try:  # a CPU without a kernel for this dtype (bf16 before AVX-512) fails here, not in the middle of a pass
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        _blocked(weight.new_zeros(2, weight.shape[1]), packed, None)
        return packed
    except (RuntimeError, AttributeError):
        return None


class Linear:
    """``x @ weight.T + bias`` for (M, K) rows; more than one row through the blocked copy when there is one."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = False) -> None:
        self.weight, self.bias = weight, bias
        self.packed = _pack(weight) if pack else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] > 1:
            return _blocked(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


def _blocked(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _stacked(*linears) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([m.weight for m in linears])
    biases = [m.bias for m in linears]
    if all(b is None for b in biases):
        return weight, None
    return weight, torch.cat(
        [b if b is not None else weight.new_zeros(m.out_features) for b, m in zip(biases, linears)]
    )


def _sources(base) -> list[torch.Tensor]:
    """Every weight the step reads, in a fixed order."""
    inner = base.model
    out = [inner.embed_tokens.weight, inner.norm.weight, base.lm_head.weight]
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for module in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            out.append(module.weight)
            if module.bias is not None:
                out.append(module.bias)
        out += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
    return out


def signature(base) -> tuple:
    """Changes when any weight the step reads is replaced, moved or written in place."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in _sources(base))


def _hooked(base) -> bool:
    """Someone watches or changes the forward — hooks (beyond prefixtune's contiguous output layer), or a
    module's ``forward`` replaced on the instance: the step would bypass them, so transformers' forward runs."""
    from torch.nn.modules import module

    if module._global_forward_hooks or module._global_forward_pre_hooks:
        return True
    for m in base.modules():
        ours = 1 if getattr(m, "_prefixtune_contiguous", False) else 0
        if m._forward_hooks or len(m._forward_pre_hooks) > ours or "forward" in m.__dict__:
            return True
    return False


def supports(base, layout) -> bool:
    """The step computes exactly this model's forward over new tokens after its cache (see module doc)."""
    config = base.config
    if config.model_type not in FAMILIES or config.is_encoder_decoder or not layout.plain or layout.sparse:
        return False
    if config.hidden_act != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return False
    if config._attn_implementation not in ("sdpa", "eager"):
        return False
    inner = getattr(base, "model", None)
    return inner is not None and hasattr(base, "lm_head") and hasattr(inner, "rotary_emb")


def weights_mode(base, mode: str) -> str:
    """``packed`` or ``plain`` for ``mode`` (``auto``: packed on CPU where the copies take at most
    :data:`MEMORY_SHARE` of this machine's memory)."""
    if mode != "auto":
        return mode
    if base.device.type != "cpu":
        return "plain"
    extra = 1.5 * sum(t.numel() * t.element_size() for t in _sources(base))
    return "packed" if extra <= MEMORY_SHARE * _physical_memory() else "plain"


class _Layer:
    """One decoder layer's weights. ``qkv`` and ``gate_up`` are one stacked product (packed mode: a copy of the
    matrices one above the other) or the model's own separate products (plain mode)."""

    __slots__ = ("eps", "norm1", "norm2", "qkv", "o", "gate_up", "down")

    def __init__(self, layer, packed: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.eps = layer.input_layernorm.variance_epsilon
        self.norm1, self.norm2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.o = Linear(attn.o_proj.weight, attn.o_proj.bias, packed)
        self.down = Linear(mlp.down_proj.weight, mlp.down_proj.bias, packed)
        groups = ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj))
        if packed:
            self.qkv, self.gate_up = ([Linear(*_stacked(*group), pack=True)] for group in groups)
        else:
            self.qkv, self.gate_up = ([Linear(m.weight, m.bias) for m in group] for group in groups)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(x) for m in self.qkv]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.gate_up) == 1:
            gate, up = self.gate_up[0](x).chunk(2, dim=-1)
        else:
            gate, up = (m(x) for m in self.gate_up)
        return self.down(F.silu(gate) * up)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm: normalized in fp32, back to the input dtype, then scaled."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


class LeanStep:
    """The step for one model and weights mode; :meth:`current` says whether the model's weights are still
    the ones it was built from."""

    def __init__(self, base, mode: str) -> None:
        config, inner = base.config, base.model
        self.mode, self.base, self.requested = weights_mode(base, mode), base, mode
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        attn = inner.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        packed = self.mode == "packed"
        self.layers = [_Layer(layer, packed) for layer in inner.layers]
        self.embed, self.rotary = inner.embed_tokens.weight, inner.rotary_emb
        self.norm, self.eps = inner.norm.weight, inner.norm.variance_epsilon
        self.head = Linear(base.lm_head.weight, getattr(base.lm_head, "bias", None), packed)
        self.signature = signature(base)

    def extra_bytes(self) -> int:
        """Memory of the copies this step made (stacked and blocked weights); 0 in plain mode."""
        if self.mode != "packed":
            return 0
        stacked = [m for layer in self.layers for m in layer.qkv + layer.gate_up]
        own = [self.head] + [m for layer in self.layers for m in (layer.o, layer.down)]
        tensors = [m.weight for m in stacked] + [m.packed for m in stacked + own if m.packed is not None]
        return sum(t.numel() * t.element_size() for t in tensors)  # blocked copies are opaque: no storage

    def current(self, base) -> bool:
        return base is self.base and signature(base) == self.signature

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor, layers) -> torch.Tensor:
        """T new tokens per row (a prompt, or one decoding step) → logits (B, V) after the last of them.

        Args:
            tokens: (B, T) the new tokens, left-padded.
            positions: (B, T) their position ids.
            key_mask: (B, K) 1 for the keys each row attends to: the cached ones, then the T new ones.
            layers: the cache's attention layers, in order; each ``update(keys, values)`` appends the new
                (B, kv_heads, T, D) keys and values and returns all of them.
        """
        (rows, new), heads, kv, dim = tokens.shape, self.heads, self.kv_heads, self.head_dim
        n = rows * new
        h = F.embedding(tokens.reshape(n), self.embed)  # (B·T, d)
        cos, sin = (t.reshape(n, 1, dim) for t in self.rotary(h, positions))  # (B·T, 1, D)
        half = dim // 2
        # rotate_half(x) * sin == flip of the halves * (sin with its first half negated)
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        mask = _mask(key_mask, new, heads // kv)
        for layer, cache_layer in zip(self.layers, layers):
            qkv = layer.project_qkv(_rms(h, layer.norm1, layer.eps)).view(n, heads + 2 * kv, dim)
            qk = qkv[:, : heads + kv]
            swapped = qk.view(n, heads + kv, 2, half).flip(2).view(n, heads + kv, dim)
            qk = torch.addcmul(qk * cos, swapped, sin)
            keys, values = cache_layer.update(_by_head(qk[:, heads:], rows), _by_head(qkv[:, heads + kv :], rows))
            queries = _grouped(qk[:, :heads], rows, kv)
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=self.scaling)
            h = h + layer.o(_ungrouped(out, rows, new))
            h = h + layer.mlp(_rms(h, layer.norm2, layer.eps))
        last = h.view(rows, new, -1)[:, -1]
        return self.head(_rms(last, self.norm, self.eps))


def _by_head(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(B·T, kv, D) → (B, kv, T, D), as the cache holds keys and values."""
    return x.view(rows, -1, *x.shape[1:]).transpose(1, 2)


def _grouped(q: torch.Tensor, rows: int, kv: int) -> torch.Tensor:
    """(B·T, H, D) queries → (B, kv, group·T, D): each key head's query heads (and positions) as one sequence,
    so attention reads every key once (transformers does the same for one-token steps)."""
    n, heads, dim = q.shape
    new = n // rows
    if new == 1:
        return q.view(rows, kv, heads // kv, dim)
    return q.view(rows, new, kv, heads // kv, dim).permute(0, 2, 3, 1, 4).reshape(rows, kv, -1, dim)


def _ungrouped(out: torch.Tensor, rows: int, new: int) -> torch.Tensor:
    """(B, kv, group·T, D) → (B·T, H·D), the input of the output projection."""
    if new == 1:
        return out.reshape(rows, -1)
    kv, dim = out.shape[1], out.shape[-1]
    return out.view(rows, kv, -1, new, dim).permute(0, 3, 1, 2, 4).reshape(rows * new, -1)


def _mask(key_mask: torch.Tensor, new: int, group: int) -> torch.Tensor | None:
    """The attention mask for ``new`` tokens per row after the cached keys, queries grouped as :func:`_grouped`:
    (B, 1, group·T, K) True where query t may read key k (a real key, not after t; every query reads its own
    key, so a padding position attends to something and stays finite), or None where nothing is masked."""
    keys = key_mask.shape[1]
    if new == 1:
        return None if bool(key_mask.all()) else key_mask.bool()[:, None, None, :]
    slot = torch.arange(keys, device=key_mask.device)
    own = keys - new + torch.arange(new, device=key_mask.device)  # (T,) each query's own slot
    mask = key_mask.bool()[:, None, :] & (slot[None, :] <= own[:, None])  # (B, T, K)
    mask |= slot[None, :] == own[:, None]
    return mask[:, None].repeat(1, 1, group, 1)


def step_for(model) -> LeanStep | None:
    """The step for a :class:`prefixtune.PrefixTunedModel` in its ``decode_weights`` mode, built once and
    rebuilt when the weights change; None where transformers' forward must run (see module doc)."""
    mode, base = model.decode_weights, model.base
    if mode not in MODES:
        raise PrefixTuneError(f"decode_weights must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "off" or base.training or torch.is_grad_enabled() or not supports(base, model.layout):
        return None
    if _hooked(base):
        return None
    step = _STEPS.get(model)
    if step is None or step.requested != mode or not step.current(base):
        step = _STEPS[model] = LeanStep(base, mode)
    return step
