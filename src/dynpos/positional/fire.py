"""FIRE: Functional Interpolation for Relative Positions.

Source: Li et al. (2024), "Functional Interpolation for Relative Positions Improves Long Context
Transformers" (ICLR). The bias of query position ``x'`` and key ``y`` is a learned function of the
*normalised* distance,

    bias[h, x, y] = f_h( psi(x' - y) / psi(max(L, x')) ),    psi(r) = log(c * r + 1),

with ``f`` a small MLP (one hidden layer of ``dim`` ReLU units, ``dim = 32`` in the paper) to one
output per head, ``c > 0`` and the threshold ``L`` learned. Dividing by the query's own position
``x'`` interpolates every sequence length into ``[0, 1)``, which is what lets the bias generalise
beyond the training length; ``L`` stops short sequences from being stretched to the whole
interval. Positions count from 0, as in the paper's reference listing (its
``torch.max(positions, threshold)`` with ``positions = torch.arange(seq_length)``): for a query
within ``L`` the normaliser is ``psi(L)`` whichever way positions are counted; beyond ``L`` it is
``psi(x')``, so the farthest key (``y = 0``) sits at ``psi(x') / (psi(x') + eps)``, just below 1.
(dynpos before issue 12 used ``x' + 1`` there.)

Parameterisation (after the paper's reference listing): ``c`` is used as ``|c|``; the threshold is
``L = |init_L * s|`` with a learned multiplier ``s`` initialised to 1, so that its gradient has a
sensible scale; ``eps`` is added to the normaliser to guard ``c -> 0``. Defaults ``init_c = 0.1``,
``init_L = 512`` follow that listing.

Because the bias depends on the query position and not only on the distance, the scheme overrides
``bias(layer, i, j)``: the MLP runs over the ``(i, j)`` grid (O(i * j * dim) work) and there is no
per-distance table for fused attention paths. The paper evaluates both per-layer FIRE and a variant
shared across layers; dynpos shares by default (``shared: true``), which costs one MLP pass per
forward instead of ``n_layer``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from dynpos.positional.base import PositionalScheme, check_option, check_sizes


class FIRE(PositionalScheme):
    """FIRE relative bias (``pos=fire``).

    Args:
        n_layer, n_head, n_embd, block_size: the model's sizes (filled in by the model).
        dim: hidden width of the MLP ``f`` (paper: 32).
        init_c: initial ``c`` of ``psi(r) = log(c r + 1)`` (> 0).
        init_L: initial threshold ``L``, in positions (> 0); ``None`` means ``block_size``.
        shared: one FIRE (MLP, ``c``, ``L``) for all blocks, or one per block.

    Raises:
        ValueError: if ``dim`` is not a positive int, or ``init_c`` / ``init_L`` is not positive.
    """

    name = "fire"
    eps = 1e-6

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, *, dim: int = 32,
                 init_c: float = 0.1, init_L: float | None = 512.0, shared: bool = True) -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        check_option(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 1, self.name, "dim", dim,
                     "the MLP's hidden width must be a positive int (the paper uses 32)")
        check_option(isinstance(init_c, (int, float)) and init_c > 0, self.name, "init_c", init_c,
                     "psi(r) = log(c r + 1) needs c > 0 (the paper starts at 0.1)")
        init_L = block_size if init_L is None else init_L
        check_option(isinstance(init_L, (int, float)) and init_L > 0, self.name, "init_L", init_L,
                     "the threshold is a length in positions: use a value > 0, or null for block_size")
        check_option(isinstance(shared, bool), self.name, "shared", shared, "use true or false")
        self.dim, self.init_L, self.shared = dim, float(init_L), shared
        copies = 1 if shared else n_layer
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(1, dim), nn.ReLU(), nn.Linear(dim, n_head)) for _ in range(copies)
        )
        self.c = nn.Parameter(torch.full((copies,), float(init_c)))
        self.L_scale = nn.Parameter(torch.ones(copies))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, init_L={self.init_L:g}, shared={self.shared}"

    def inputs(self, layer: int, i: int, j: int) -> Tensor:
        """The MLP's inputs ``(i, j)``: ``psi(x' - y) / (psi(max(L, x')) + eps)`` with ``x' = j - i + x``.

        In ``[0, 1)`` wherever ``y <= x'``; entries above the causal diagonal use distance 0
        (the causal mask removes them).

        Raises:
            ValueError: if ``i`` or ``j`` is negative or not an int, or ``j < i``.
        """
        check_sizes(i, j)
        k = 0 if self.shared else layer
        device = self.c.device
        query = torch.arange(j - i, j, device=device, dtype=torch.float32)  # x'
        key = torch.arange(j, device=device, dtype=torch.float32)
        distance = (rearrange(query, "i -> i 1") - rearrange(key, "j -> 1 j")).clamp(min=0)
        c = self.c[k].float().abs()
        threshold = (self.L_scale[k].float() * self.init_L).abs()
        normaliser = torch.log1p(c * torch.maximum(query, threshold)) + self.eps  # (i,), positions from 0
        return torch.log1p(c * distance) / rearrange(normaliser, "i -> i 1")

    def bias(self, layer: int, i: int, j: int) -> Tensor:
        """``(n_head, i, j)`` bias for ``i`` queries that are the last ``i`` of ``j`` positions."""
        mlp = self.mlps[0 if self.shared else layer]
        x = self.inputs(layer, i, j).to(mlp[0].weight.dtype)
        return rearrange(mlp(rearrange(x, "i j -> i j 1")), "i j h -> h i j")
