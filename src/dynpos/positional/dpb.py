"""Dynamic Position Bias (DPB): a small MLP from relative distance to one logit bias per head.

Sources: CrossFormer (Wang et al., 2021) introduced DPB; SwinV2 (Liu et al., 2022) the log-spaced
distances; the zeta and x-transformers libraries the API (``DynamicPositionBias(dim, heads)``,
``bias = dpb(i, j)``). The MLP runs over the distinct distances only, and the ``(i, j)`` grid is
gathered from that table: O(j · dim) MLP work, never O(i · j · dim).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from dynpos.positional.base import PositionalScheme, check_sizes, is_count


class DynamicPositionBias(nn.Module):
    """MLP mapping a relative distance (in positions) to an additive attention bias for each head.

    ``mlp``: ``depth`` hidden layers of width ``dim`` (``depth=2``: Linear(1, dim) -> SiLU ->
    Linear(dim, dim) -> SiLU -> Linear(dim, heads)), with a LayerNorm after each hidden Linear if
    ``norm``. ``log_distance`` feeds ``sign(r) · log(1 + |r|)`` (SwinV2); ``signed`` the signed
    distance ``x - y`` (asymmetric, for bidirectional use) instead of ``|x - y|``.

    Raises:
        ValueError: if ``dim``, ``heads`` or ``depth`` is not a positive int.
    """

    def __init__(self, dim: int, heads: int, *, depth: int = 2, log_distance: bool = False, norm: bool = False,
                 signed: bool = False) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("depth", depth)):
            if not is_count(value):
                raise ValueError(f"DynamicPositionBias: {name} must be a positive int, got {value!r}")
        self.dim, self.heads, self.depth = dim, heads, depth
        self.log_distance, self.norm, self.signed = log_distance, norm, signed
        layers: list[nn.Module] = []
        for layer in range(depth):
            layers.append(nn.Linear(1 if layer == 0 else dim, dim))
            layers += [nn.LayerNorm(dim), nn.SiLU()] if norm else [nn.SiLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(dim, heads))

    def extra_repr(self) -> str:
        return f"log_distance={self.log_distance}, signed={self.signed}"

    def embed(self, distances: Tensor) -> Tensor:
        """Bias ``(heads, n)`` of ``(n,)`` distances."""
        r = distances.to(self.mlp[0].weight.dtype).unsqueeze(-1)
        if self.log_distance:
            r = torch.sign(r) * torch.log1p(r.abs())
        return rearrange(self.mlp(r), "n h -> h n")

    def distance_table(self, j: int) -> Tensor:
        """Per-distance table ``(heads, j)``, the bias at distance ``r = 0 .. j-1``: all a causal query
        sees, read by the fused paths. Raises ValueError if ``j`` is not an int ``>= 0``."""
        check_sizes(0, j)
        return self.embed(torch.arange(j, device=self.mlp[0].weight.device))

    def forward(self, i: int, j: int) -> Tensor:
        """Bias ``(heads, i, j)`` for ``i`` queries that are the last ``i`` of ``j`` positions:
        ``MLP_h(|x' - y|)`` (``x' - y`` when ``signed``), ``x' = j - i + x``. Raises ValueError if
        ``i`` or ``j`` is not an int ``>= 0``, or ``j < i``."""
        check_sizes(i, j)
        device = self.mlp[0].weight.device
        rel = rearrange(torch.arange(j - i, j, device=device), "i -> i 1") - torch.arange(j, device=device)  # x' - y
        distances = rel if self.signed else rel.abs()
        lowest = -(i - 1) if self.signed and i else 0  # rel >= -(i-1): the MLP runs over lowest .. j-1 only
        return self.embed(torch.arange(lowest, j, device=device))[:, distances - lowest]


class DPB(PositionalScheme):
    """DPB as the GPT's scheme (``pos=dpb``): one :class:`DynamicPositionBias` per block, or one
    ``shared`` by all (computed once per forward); ``dim`` None is ``n_embd // 4`` (x-transformers)."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, *, dim: int | None = None,
                 depth: int = 2, log_distance: bool = False, norm: bool = False, signed: bool = False,
                 shared: bool = False) -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        self.shared = shared
        dim = max(n_embd // 4, 1) if dim is None else dim
        self.dpbs = nn.ModuleList(
            DynamicPositionBias(dim, n_head, depth=depth, log_distance=log_distance, norm=norm, signed=signed)
            for _ in range(1 if shared else n_layer)
        )

    def table(self, layer: int, j: int) -> Tensor:
        return self.dpbs[0 if self.shared else layer].distance_table(j)
