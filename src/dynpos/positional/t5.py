"""T5 relative position bias: one learned scalar per head for each bucket of distances.

Source: Raffel et al. (2020), "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (JMLR), section 2.1, with the causal (decoder) bucketing.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from dynpos.positional.base import PositionalScheme, check_option, is_count


def t5_bucket(distance: Tensor, num_buckets: int = 32, max_distance: int = 128) -> Tensor:
    """Causal T5 bucket (``torch.long``, same shape) of each integer distance ``d = x' - y >= 0``:
    ``d`` for ``d < e = num_buckets // 2``, else the log-spaced
    ``min(num_buckets - 1, e + floor(log(d / e) / log(max_distance / e) * (num_buckets - e)))``, so
    every distance from ``max_distance`` on (from 113 with the defaults) shares the last bucket."""
    exact = num_buckets // 2
    distance = distance.long()
    scaled = torch.log(distance.clamp(min=exact).float() / exact) / math.log(max_distance / exact)
    large = (exact + (scaled * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return torch.where(distance < exact, distance, large)


class T5(PositionalScheme):
    """T5 bucketed relative bias (``pos=t5``): ``table[h, r] = embedding[bucket(r), h]``, the embedding
    ``(num_buckets, n_head)`` initialised ``N(0, n_embd ** -0.5)`` (Hugging Face's T5); buckets as in
    :func:`t5_bucket` (T5: 32 and 128); ``shared``: one table for all blocks (T5), or one per block.
    Raises ValueError on ``num_buckets < 2``, ``max_distance <= num_buckets // 2`` or a non-bool ``shared``.
    """

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, *,
                 num_buckets: int = 32, max_distance: int = 128, shared: bool = True) -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        check_option(is_count(num_buckets, 2), self.name, "num_buckets", num_buckets, "use an int >= 2 (T5 uses 32)")
        check_option(is_count(max_distance, num_buckets // 2 + 1), self.name, "max_distance", max_distance,
                     f"it must be an int > num_buckets // 2 = {num_buckets // 2}, where the log-spaced buckets "
                     "begin (T5 uses 128 with 32 buckets)")
        check_option(isinstance(shared, bool), self.name, "shared", shared, "use true or false")
        self.num_buckets, self.max_distance, self.shared = num_buckets, max_distance, shared
        self.embeddings = nn.ModuleList(nn.Embedding(num_buckets, n_head) for _ in range(1 if shared else n_layer))
        for embedding in self.embeddings:
            nn.init.normal_(embedding.weight, mean=0.0, std=n_embd ** -0.5)

    def table(self, layer: int, j: int) -> Tensor:
        embedding = self.embeddings[0 if self.shared else layer]
        buckets = t5_bucket(torch.arange(j, device=embedding.weight.device), self.num_buckets, self.max_distance)
        return rearrange(embedding(buckets), "j h -> h j")
