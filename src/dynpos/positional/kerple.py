"""KERPLE: kernelized relative positional embedding, logarithmic variant (the power one is not here).

Source: Chi, Fan, Ramadge & Rudnicky (2022), "KERPLE: Kernelized Relative Positional Embedding for
Length Extrapolation" (NeurIPS), and the authors' code (github.com/chijames/KERPLE,
``ParallelKerpleLog``): the init, and ``eps = 0.01``. The authors clamp ``r1, r2`` in place at every
forward; dynpos reads ``max(r, eps)`` with a straight-through gradient, and ``project_()`` after an
optimizer step clamps in place, which reproduces the authors' updates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynpos.positional.base import PositionalScheme, check_option


class KERPLE(PositionalScheme):
    """KERPLE-log bias (``pos=kerple``): ``table[h, r] = -r1_h * log(1 + r2_h * r)`` (logit units) in each block.

    ``r1``, ``r2``: one ``(n_head,)`` parameter per block, drawn by ``init="uniform"`` as the authors do
    (``U(0, 2)``, ``U(0, 1)`` per head, from the global torch RNG) or set to 1 by ``init="ones"``.
    Raises ValueError for another ``init``.
    """

    eps = 0.01

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, *, init: str = "uniform") -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        check_option(init in ("uniform", "ones"), self.name, "init", init,
                     "use uniform (the authors': r1 ~ U(0, 2), r2 ~ U(0, 1) per head) or ones (r1 = r2 = 1)")
        self.init = init
        pairs = [((2.0 * torch.rand(n_head)).clamp(min=self.eps), torch.rand(n_head).clamp(min=self.eps))
                 if init == "uniform" else (torch.ones(n_head), torch.ones(n_head)) for _ in range(n_layer)]
        self.r1 = nn.ParameterList(nn.Parameter(r1) for r1, _ in pairs)
        self.r2 = nn.ParameterList(nn.Parameter(r2) for _, r2 in pairs)

    def coefficients(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(r1, r2)`` of block ``layer``, each ``(n_head,)``: ``max(r, eps)``, gradient straight through."""
        return tuple(r + (r.clamp(min=self.eps) - r).detach() for r in (self.r1[layer], self.r2[layer]))

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the stored ``r1``, ``r2`` at ``eps`` in place (after each optimizer step)."""
        for r in (*self.r1, *self.r2):
            r.clamp_(min=self.eps)

    def table(self, layer: int, j: int) -> Tensor:
        r1, r2 = self.coefficients(layer)
        distances = torch.arange(j, device=r1.device, dtype=r1.dtype)
        return -r1.unsqueeze(-1) * torch.log1p(r2.unsqueeze(-1) * distances)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints from before issue 12 stored softplus-parameterised r1_raw / r2_raw.
        for name in ("r1", "r2"):
            old = f"{prefix}{name}_raw."
            for key in [k for k in state_dict if k.startswith(old)]:
                state_dict[f"{prefix}{name}.{key[len(old):]}"] = F.softplus(state_dict.pop(key))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
