"""FIRE: Functional Interpolation for Relative Positions.

Source: Li et al. (2024), "Functional Interpolation for Relative Positions Improves Long Context
Transformers" (ICLR), and its reference listing. The bias of query position ``x'`` and key ``y`` is
a learned function of the normalised distance,

    bias[h, x, y] = f_h( psi(x' - y) / psi(max(L, x')) ),    psi(r) = log(c * r + 1),

``f`` an MLP with one hidden layer of ``dim`` ReLU units, ``c > 0`` and the threshold ``L`` learned.
Dividing by the query's own position maps every length into ``[0, 1)``; ``L`` keeps short
sequences from being stretched over it. As in the listing: positions count from 0 (dynpos before
issue 12 used ``x' + 1``), ``c`` is used as ``|c|``, ``L = |init_L * s|`` with a learned ``s``
initialised to 1, and ``eps`` is added to the normaliser. The bias depends on the query position,
so the MLP runs over the ``(i, j)`` grid and there is no per-distance table for the fused paths.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from dynpos.positional.base import PositionalScheme, check_option, check_sizes, is_count


class FIRE(PositionalScheme):
    """FIRE relative bias (``pos=fire``).

    Args:
        n_layer, n_head, n_embd, block_size: the model's sizes (filled in by the model).
        dim: hidden width of the MLP ``f`` (paper: 32).
        init_c: initial ``c`` of ``psi(r) = log(c r + 1)`` (> 0; paper: 0.1).
        init_L: initial threshold ``L``, in positions (> 0; paper: 512); None means ``block_size``.
        shared: one FIRE (MLP, ``c``, ``L``) for all blocks, or one per block (the paper has both).

    Raises:
        ValueError: if ``dim`` is not a positive int, ``init_c`` or ``init_L`` is not positive, or
            ``shared`` is not a bool.
    """

    name = "fire"
    eps = 1e-6

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, *, dim: int = 32,
                 init_c: float = 0.1, init_L: float | None = 512.0, shared: bool = True) -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        check_option(is_count(dim), self.name, "dim", dim,
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
        """The MLP's inputs ``(i, j)``, ``psi(x' - y) / (psi(max(L, x')) + eps)`` with ``x' = j - i + x``:
        in ``[0, 1)`` where ``y <= x'``, and at distance 0 above the causal diagonal.

        Raises:
            ValueError: if ``i`` or ``j`` is not an int ``>= 0``, or ``j < i``.
        """
        check_sizes(i, j)
        k = 0 if self.shared else layer
        device = self.c.device
        query = torch.arange(j - i, j, device=device, dtype=torch.float32)  # x'
        key = torch.arange(j, device=device, dtype=torch.float32)
        distance = (rearrange(query, "i -> i 1") - rearrange(key, "j -> 1 j")).clamp(min=0)
        c = self.c[k].float().abs()
        threshold = (self.L_scale[k].float() * self.init_L).abs()
        normaliser = torch.log1p(c * torch.maximum(query, threshold)) + self.eps  # (i,)
        return torch.log1p(c * distance) / rearrange(normaliser, "i -> i 1")

    def bias(self, layer: int, i: int, j: int) -> Tensor:
        """``(n_head, i, j)`` bias for ``i`` queries that are the last ``i`` of ``j`` positions."""
        mlp = self.mlps[0 if self.shared else layer]
        x = self.inputs(layer, i, j).to(mlp[0].weight.dtype)
        return rearrange(mlp(rearrange(x, "i j -> i j 1")), "i j h -> h i j")
