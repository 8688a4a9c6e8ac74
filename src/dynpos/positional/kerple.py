"""KERPLE: kernelized relative positional embedding, logarithmic variant.

Source: Chi, Fan, Ramadge & Rudnicky (2022), "KERPLE: Kernelized Relative Positional Embedding for
Length Extrapolation" (NeurIPS). The logit of query ``x'`` and key ``y`` receives
``-r1_h * log(1 + r2_h * (x' - y))``, a conditionally positive definite kernel of the distance with
two learned positive parameters per head and per block. (The paper's other variant, the power
kernel ``-r1 |x' - y|^r2``, is not implemented here.)

Parameterisation: ``r1 = softplus(a)`` and ``r2 = softplus(b)`` with ``a, b`` unconstrained, so
both stay strictly positive and every value keeps a gradient (the authors' code clamps to a small
minimum instead). Both start at 1 for every head: at init the bias is ``-log(1 + r)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynpos.positional.base import PositionalScheme, check_sizes


class KERPLE(PositionalScheme):
    """KERPLE-log bias (``pos=kerple``): ``table[h, r] = -r1_h * log(1 + r2_h * r)`` in each block.

    Args:
        n_layer, n_head, n_embd, block_size: the model's sizes (filled in by the model).

    Attributes:
        r1_raw, r2_raw: one ``(n_head,)`` unconstrained parameter per block; ``r = softplus(raw)``.
            One-dimensional, so the optimizer puts them in the no-weight-decay group.

    Raises:
        ValueError: if a model size is not a positive int.
    """

    name = "kerple"

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int) -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        one = math.log(math.expm1(1.0))  # softplus(one) == 1
        self.r1_raw = nn.ParameterList(nn.Parameter(torch.full((n_head,), one)) for _ in range(n_layer))
        self.r2_raw = nn.ParameterList(nn.Parameter(torch.full((n_head,), one)) for _ in range(n_layer))

    def coefficients(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(r1, r2)`` of block ``layer``, each ``(n_head,)`` and > 0."""
        return F.softplus(self.r1_raw[layer]), F.softplus(self.r2_raw[layer])

    def table(self, layer: int, j: int) -> Tensor:
        """``(n_head, j)``: ``-r1_h * log(1 + r2_h * r)`` at distance ``r = 0 .. j-1`` (logit units)."""
        check_sizes(0, j)
        r1, r2 = self.coefficients(layer)
        distances = torch.arange(j, device=r1.device, dtype=r1.dtype)
        return -r1.unsqueeze(-1) * torch.log1p(r2.unsqueeze(-1) * distances)
