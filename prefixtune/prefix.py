"""The prefix itself: its parameters, the MLP reparameterization and its ejection.

Li & Liang 2021, §4.3: training the prefix P_θ directly is unstable, so it is reparameterized as
P_θ[i, :] = MLP_θ(P'_θ[i, :]) with a smaller embedding P' (P × d) and an MLP d → mid → tanh → out.
After training only P_θ is kept (:meth:`PrefixParams.eject`). How the prefix enters the model is
in :mod:`prefixtune.injection`; this module only produces tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import PrefixConfig
from .errors import PrefixTuneError
from .geometry import Geometry


class PrefixParams(nn.Module):
    """Produces one prefix tensor of shape (P, *token_shape), flat or through the MLP.

    Args:
        num_tokens: P.
        token_shape: Shape of one virtual token's values, e.g. (L, 2, kv_heads, D) or (d,).
        in_dim: Width d of the reparameterization embedding P'.
        reparameterize: Use the MLP (True) or train the tensor directly (False).
        mid_dim: Hidden width of the MLP.
        init_std: Standard deviation of a random flat initialization.
    """

    def __init__(
        self,
        num_tokens: int,
        token_shape: tuple[int, ...],
        in_dim: int,
        reparameterize: bool,
        mid_dim: int,
        init_std: float,
    ) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.token_shape = tuple(token_shape)
        out = math.prod(self.token_shape)
        if reparameterize:
            self.embedding = nn.Parameter(torch.randn(num_tokens, in_dim))  # P' (P, d)
            self.mlp = nn.Sequential(nn.Linear(in_dim, mid_dim), nn.Tanh(), nn.Linear(mid_dim, out))
        else:
            self.flat = nn.Parameter(torch.randn(num_tokens, *self.token_shape) * init_std)

    @property
    def reparameterized(self) -> bool:
        return hasattr(self, "mlp")

    def forward(self) -> torch.Tensor:
        """Returns the prefix, shape (P, *token_shape)."""
        if not self.reparameterized:
            return self.flat
        return self.mlp(self.embedding).view(self.num_tokens, *self.token_shape)  # (P, L, 2, H, D)

    @torch.no_grad()
    def eject(self) -> None:
        """Replace the MLP by the flat tensor it produces (§4.3). Outputs stay identical."""
        if not self.reparameterized:
            return
        flat = self.forward().detach().clone()
        del self.mlp
        del self.embedding
        self.flat = nn.Parameter(flat)

    @torch.no_grad()
    def fit(self, target: torch.Tensor) -> None:
        """Make the prefix equal ``target`` (P, *token_shape).

        Flat: a copy. Reparameterized: the MLP's last layer is solved in closed form so that
        tanh(P' W1 + b1) W2 + b2 = target, the minimum-norm least-squares solution, exact while
        mid_dim ≥ P. The embedding and first layer keep their random values, so training
        proceeds as from a random start.
        """
        if target.shape != (self.num_tokens, *self.token_shape):
            raise PrefixTuneError(
                f"cannot fit prefix: target shape {tuple(target.shape)} != {(self.num_tokens, *self.token_shape)}"
            )
        if not self.reparameterized:
            self.flat.copy_(target)
            return
        first, last = self.mlp[0], self.mlp[2]
        if first.out_features < self.num_tokens:
            raise PrefixTuneError(
                f"mid_dim={first.out_features} is smaller than the prefix length {self.num_tokens}; "
                "the MLP cannot reproduce init_text exactly. Raise mid_dim."
            )
        hidden = torch.tanh(self.embedding.double() @ first.weight.double().T + first.bias.double())  # (P, mid)
        goal = target.reshape(self.num_tokens, -1).double()  # (P, out)
        weight_t = torch.linalg.pinv(hidden) @ goal  # (mid, out)
        last.weight.copy_(weight_t.T.to(last.weight.dtype))
        last.bias.zero_()


def token_shapes(mode: str, geometry: Geometry) -> dict[str, tuple[int, ...]]:
    """Each part's shape per virtual token: per stack (``kv`` mode), or the embedding width (``embedding``)."""
    if mode == "kv":
        return {s.name: s.token_shape for s in geometry.stacks}
    return {"embedding": (geometry.hidden_size,)}


class Prefix(nn.Module):
    """One named prefix: a :class:`PrefixParams` per attention stack, or one for input embeddings.

    In ``kv`` mode the parts are named after the stacks (``decoder``, ``encoder``, ``cross``), each
    producing (P, L, 2, kv_heads, D). In ``embedding`` mode the single part ``embedding``
    produces (P, d).
    """

    def __init__(self, config: PrefixConfig, geometry: Geometry) -> None:
        super().__init__()
        if config.num_virtual_tokens is None:
            raise PrefixTuneError("num_virtual_tokens is unset; set it or give init_text")
        self.config = config
        p, d = config.num_virtual_tokens, geometry.hidden_size
        shapes = token_shapes(config.mode, geometry)
        self._projected = None  # (parameter versions, tensors): the MLP output cached for inference
        self.parts = nn.ModuleDict(
            {
                name: PrefixParams(p, shape, d, config.reparameterize, config.mid_dim, config.init_std)
                for name, shape in shapes.items()
            }
        )

    @property
    def num_tokens(self) -> int:
        return self.config.num_virtual_tokens

    @property
    def mode(self) -> str:
        return self.config.mode

    def forward(self) -> dict[str, torch.Tensor]:
        """Returns each part's tensor, with dropout while training.

        Outside training and autograd (decoding, dev loss, serving) the MLP's output is computed once
        and reused until a parameter changes (tracked by the tensors' version counters).
        """
        if not self.training and not torch.is_grad_enabled():
            key = tuple((id(p), p._version, p.data_ptr()) for p in self.parameters())
            if self._projected is None or self._projected[0] != key:
                self._projected = (key, {name: part().detach() for name, part in self.parts.items()})
            return dict(self._projected[1])
        out = {}
        for name, part in self.parts.items():
            value = part()
            if self.training and self.config.dropout > 0:
                value = nn.functional.dropout(value, self.config.dropout)
            out[name] = value
        return out

    def eject(self) -> None:
        for part in self.parts.values():
            part.eject()
        self.config.reparameterize = False

    def flat_state(self) -> dict[str, torch.Tensor]:
        """The ejected tensors, without changing this module: what a saved prefix holds."""
        with torch.no_grad():
            return {name: part().detach().contiguous() for name, part in self.parts.items()}


def count_parameters(config: PrefixConfig, geometry: Geometry) -> int:
    """Trainable parameters of a prefix, by formula (used to check the model, oracle 8e)."""
    p, d = config.num_virtual_tokens, geometry.hidden_size
    sizes = [s.token_size for s in geometry.stacks] if config.mode == "kv" else [d]
    if not config.reparameterize:
        return p * sum(sizes)
    m = config.mid_dim
    return sum(p * d + d * m + m + m * out + out for out in sizes)
