"""FIRE: Functional Interpolation for Relative Positions.

Source: Li et al. (2024), "Functional Interpolation for Relative Positions Improves Long Context
Transformers" (ICLR), and its reference listing: ``bias[h, x, y] = f_h(psi(x' - y) / psi(max(L, x')))``,
``psi(r) = log(c r + 1)``, ``f`` an MLP with one hidden ReLU layer. As in the listing, positions
count from 0, ``c`` is used as ``|c|``, ``L = |init_L * s|`` with a learned ``s`` (initially 1), and
``eps`` guards the normaliser. The bias depends on the query position: no per-distance table.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from dynpos.positional.base import PositionalScheme, check_option, check_sizes, is_count


class FIRE(PositionalScheme):
    """FIRE relative bias (``pos=fire``): MLP width ``dim``, initial ``c`` and threshold ``L`` (in
    positions; None: ``block_size``) as the paper's 32, 0.1 and 512; ``shared``: one FIRE for all
    blocks, or one per block. Raises ValueError if ``dim``, ``init_c`` or ``init_L`` is not positive,
    or ``shared`` not a bool.
    """

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

    def inputs(self, layer: int, i: int, j: int) -> Tensor:
        """The MLP's inputs ``(i, j)``, ``psi(x' - y) / (psi(max(L, x')) + eps)``, ``x' = j - i + x``: in
        ``[0, 1)`` where ``y <= x'``, distance 0 above. Raises ValueError as :func:`check_sizes`."""
        check_sizes(i, j)
        k = 0 if self.shared else layer
        query = torch.arange(j - i, j, device=self.c.device, dtype=torch.float32)  # x'
        distance = (rearrange(query, "i -> i 1") - torch.arange(j, device=query.device, dtype=query.dtype)).clamp(min=0)
        c = self.c[k].float().abs()
        threshold = (self.L_scale[k].float() * self.init_L).abs()
        normaliser = torch.log1p(c * torch.maximum(query, threshold)) + self.eps  # (i,)
        return torch.log1p(c * distance) / rearrange(normaliser, "i -> i 1")

    def bias(self, layer: int, i: int, j: int) -> Tensor:
        mlp = self.mlps[0 if self.shared else layer]
        x = self.inputs(layer, i, j).to(mlp[0].weight.dtype)
        return rearrange(mlp(rearrange(x, "i j -> i j 1")), "i j h -> h i j")
