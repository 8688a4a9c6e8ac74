"""ALiBi: Attention with Linear Biases, a fixed penalty proportional to distance.

Source: Press, Smith & Lewis (2022), "Train Short, Test Long: Attention with Linear Biases Enables
Input Length Extrapolation" (ICLR). Head ``h`` adds ``-m_h * (x' - y)`` to the logit of query
``x'`` and key ``y``; the slopes ``m_h`` form a geometric sequence fixed before training, and no
positional embedding is added anywhere else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynpos.positional.base import PositionalScheme, check_sizes


def alibi_slopes(n_head: int) -> list[float]:
    """The paper's head slopes, largest penalty ... smallest, as Python floats.

    For ``n_head`` a power of two: ``2^(-8k/n_head)`` for ``k = 1 .. n_head`` (8 heads give
    ``1/2, 1/4, ..., 1/256``). Otherwise the paper's rule: the slopes of the closest lower power
    of two ``p``, then every other slope of ``2p`` heads (``2^(-8k/2p)`` for odd ``k``) until
    there are ``n_head``.

    Raises:
        ValueError: if ``n_head`` is not a positive int.
    """
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1:
        raise ValueError(f"n_head must be a positive int, got {n_head!r}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

    lower = 1 << (n_head.bit_length() - 1)  # closest power of two <= n_head
    if lower == n_head:
        return geometric(n_head)
    return geometric(lower) + geometric(2 * lower)[0::2][: n_head - lower]


class ALiBi(PositionalScheme):
    """ALiBi as a positional scheme (``pos=alibi``): ``table[h, r] = -m_h * r``, the same in every block.

    The slopes are a non-persistent buffer (derived from ``n_head``, never learned, not saved in
    checkpoints). The bias is computed once per forward and shared by all blocks.

    Args:
        n_layer, n_head, n_embd, block_size: the model's sizes (filled in by the model).

    Raises:
        ValueError: if a model size is not a positive int.
    """

    name = "alibi"
    shared = True

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int) -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        self.register_buffer("slopes", torch.tensor(alibi_slopes(n_head), dtype=torch.float32), persistent=False)

    def table(self, layer: int, j: int) -> Tensor:
        """``(n_head, j)`` float32 table, ``-m_h * r`` at distance ``r = 0 .. j-1`` (logit units)."""
        check_sizes(0, j)
        distances = torch.arange(j, device=self.slopes.device, dtype=torch.float32)
        return -self.slopes.float().unsqueeze(-1) * distances
