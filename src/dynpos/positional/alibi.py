"""ALiBi: Attention with Linear Biases, a fixed penalty proportional to distance.

Source: Press, Smith & Lewis (2022), "Train Short, Test Long: Attention with Linear Biases Enables
Input Length Extrapolation" (ICLR).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynpos.positional.base import PositionalScheme


def alibi_slopes(n_head: int) -> list[float]:
    """The paper's slopes: ``2^(-8k/n_head)``, ``k = 1 .. n_head``, for a power of two; otherwise those
    of the power of two ``p`` below, then the odd-``k`` slopes of ``2p`` heads until there are ``n_head``."""

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    lower = 1 << (n_head.bit_length() - 1)  # closest power of two <= n_head
    return geometric(lower) + geometric(2 * lower)[0::2][: n_head - lower]


class ALiBi(PositionalScheme):
    """ALiBi (``pos=alibi``): ``table[h, r] = -m_h * r`` (logit units) at distance ``r`` in every block; the
    slopes ``m_h`` (:func:`alibi_slopes`) are a fixed, non-persistent buffer (not saved in checkpoints)."""

    shared = True

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int) -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        self.register_buffer("slopes", torch.tensor(alibi_slopes(n_head), dtype=torch.float32), persistent=False)

    def table(self, layer: int, j: int) -> Tensor:
        distances = torch.arange(j, device=self.slopes.device, dtype=torch.float32)
        return -self.slopes.float().unsqueeze(-1) * distances
