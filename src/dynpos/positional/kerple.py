"""KERPLE: kernelized relative positional embedding, logarithmic variant.

Source: Chi, Fan, Ramadge & Rudnicky (2022), "KERPLE: Kernelized Relative Positional Embedding for
Length Extrapolation" (NeurIPS). The logit of query ``x'`` and key ``y`` receives
``-r1_h * log(1 + r2_h * (x' - y))``, a conditionally positive definite kernel of the distance with
two learned positive parameters per head and per block. (The paper's other variant, the power
kernel ``-r1 |x' - y|^r2``, is not implemented here.)

Initialisation and parameterisation follow the authors' code (github.com/chijames/KERPLE,
``ParallelKerpleLog`` in ``megatron/mpu/layers.py``: ``bias_p`` is ``r1``, ``bias_a`` is ``r2``):
``r1 ~ U(0, 2)`` and ``r2 ~ U(0, 1)`` per head (``torch.rand``, drawn layer by layer, ``r1`` before
``r2``), stored as they are and kept at least ``eps = 0.01``. The authors clamp the stored values
in place at every forward; dynpos clamps them once at initialisation, reads them as
``max(r, eps)`` with the gradient passed straight through (so a value that an optimizer step takes
below ``eps`` can still come back), and offers ``project_()`` to clamp the stored values in place
after an optimizer step, which makes the training dynamics the authors' exactly. ``init: ones``
starts every head at ``r1 = r2 = 1`` instead (dynpos before issue 12).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynpos.positional.base import PositionalScheme, check_option, check_sizes


class KERPLE(PositionalScheme):
    """KERPLE-log bias (``pos=kerple``): ``table[h, r] = -r1_h * log(1 + r2_h * r)`` in each block.

    Args:
        n_layer, n_head, n_embd, block_size: the model's sizes (filled in by the model).
        init: ``"uniform"`` (the authors': ``r1 ~ U(0, 2)``, ``r2 ~ U(0, 1)`` per head, from the
            global torch RNG, clamped at ``eps``) or ``"ones"`` (``r1 = r2 = 1``).

    Attributes:
        r1, r2: one ``(n_head,)`` parameter per block, the kernel's coefficients as stored
            (read through ``coefficients``). One-dimensional, so the optimizer puts them in the
            no-weight-decay group.
        eps: the smallest coefficient, 0.01 (the authors' ``self.eps``).

    Raises:
        ValueError: if a model size is not a positive int, or ``init`` is neither value.
    """

    name = "kerple"
    eps = 0.01

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, *, init: str = "uniform") -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        check_option(init in ("uniform", "ones"), self.name, "init", init,
                     "use uniform (the authors': r1 ~ U(0, 2), r2 ~ U(0, 1) per head) or ones (r1 = r2 = 1)")
        self.init = init
        r1, r2 = [], []
        for _ in range(n_layer):
            if init == "uniform":
                r1.append((2.0 * torch.rand(n_head)).clamp(min=self.eps))
                r2.append(torch.rand(n_head).clamp(min=self.eps))
            else:
                r1.append(torch.ones(n_head))
                r2.append(torch.ones(n_head))
        self.r1 = nn.ParameterList(nn.Parameter(r) for r in r1)
        self.r2 = nn.ParameterList(nn.Parameter(r) for r in r2)

    def extra_repr(self) -> str:
        return f"init={self.init}"

    def _floor(self, r: Tensor) -> Tensor:
        """``max(r, eps)`` in value; the gradient reaches ``r`` unchanged (straight-through)."""
        return r + (r.clamp(min=self.eps) - r).detach()

    def coefficients(self, layer: int) -> tuple[Tensor, Tensor]:
        """``(r1, r2)`` of block ``layer``, each ``(n_head,)`` and ``>= eps``."""
        return self._floor(self.r1[layer]), self._floor(self.r2[layer])

    @torch.no_grad()
    def project_(self) -> None:
        """Clamp the stored ``r1``, ``r2`` at ``eps`` in place, as the authors' code does at every forward.

        Called after each optimizer step, it makes training follow the authors' projected updates
        exactly; without it a stored value below ``eps`` reads as ``eps`` and keeps its gradient.
        """
        for r in (*self.r1, *self.r2):
            r.clamp_(min=self.eps)

    def table(self, layer: int, j: int) -> Tensor:
        """``(n_head, j)``: ``-r1_h * log(1 + r2_h * r)`` at distance ``r = 0 .. j-1`` (logit units)."""
        check_sizes(0, j)
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
