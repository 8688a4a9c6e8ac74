"""Learned absolute position embedding, one vector per position ``0 .. block_size - 1``.

Source: Radford et al. (2019), "Language Models are Unsupervised Multitask Learners" (GPT-2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynpos.positional.base import PositionalScheme, check_option


class Learned(PositionalScheme):
    """Learned absolute embedding (``pos=learned``): ``wpe (block_size, n_embd)`` added to the tokens,
    initialised with standard deviation ``init_std`` (GPT-2: 0.02). Raises ValueError if it is < 0."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, *, init_std: float = 0.02) -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        check_option(isinstance(init_std, (int, float)) and init_std >= 0, self.name, "init_std", init_std,
                     "use a standard deviation >= 0")
        self.max_length = block_size
        self.wpe = nn.Parameter(torch.empty(block_size, n_embd))
        nn.init.normal_(self.wpe, mean=0.0, std=float(init_std))

    def absolute(self, t: int, offset: int = 0) -> Tensor:
        """Rows ``offset .. offset + t - 1`` of ``wpe``, ``(t, n_embd)``; ValueError past ``block_size``."""
        if offset < 0 or t < 0 or offset + t > self.block_size:
            raise ValueError(f"pos=learned has embeddings for positions 0..{self.block_size - 1}, asked for "
                             f"{offset}..{offset + t - 1}: keep sequences within model.block_size")
        return self.wpe[offset: offset + t]
