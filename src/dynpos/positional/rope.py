"""RoPE: rotary position embedding of queries and keys.

Source: Su et al. (2021), "RoFormer: Enhanced Transformer with Rotary Position Embedding"; the
rotate-half pairing (channel ``i`` with ``i + d/2``) and partial rotation (``rotary_pct``) of GPT-NeoX.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynpos.positional.base import PositionalScheme, check_option
from dynpos.positional.sinusoidal import inverse_frequencies


class RoPE(PositionalScheme):
    """Rotary position embedding (``pos=rope``): channel pair ``i`` at position ``p`` turns by
    ``p * base^(-2i/d)`` radians in every block (the paper's ``base``: 10000), in the first ``rotary_dim``
    of each head's channels; cos and sin cached in float32 (q, k keep their dtype), grown on demand.
    Raises ValueError if the head dimension is odd, ``base <= 1``, or ``rotary_dim`` is outside
    ``(0, 1]`` or gives an odd number of channels.
    """

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, *,
                 base: float = 10000.0, rotary_dim: float = 1.0) -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        head_dim = n_embd // n_head
        if head_dim % 2:
            raise ValueError(f"pos=rope rotates channel pairs, but the head dimension model.n_embd / model.n_head = "
                             f"{n_embd} / {n_head} = {head_dim} is odd: choose n_embd and n_head with an even quotient")
        check_option(isinstance(base, (int, float)) and base > 1, self.name, "base", base,
                     "the wavelength base must be a number > 1 (the paper uses 10000)")
        check_option(isinstance(rotary_dim, (int, float)) and 0 < rotary_dim <= 1, self.name, "rotary_dim",
                     rotary_dim, "it is the fraction of each head's channels that rotate: choose a value in (0, 1]")
        channels = round(rotary_dim * head_dim)
        check_option(channels >= 2 and channels % 2 == 0, self.name, "rotary_dim", rotary_dim,
                     f"it gives {channels} of the {head_dim} head channels, which must be an even number >= 2: "
                     f"choose a fraction f with f * {head_dim} even")
        self.base, self.rotary_dim, self.channels = float(base), float(rotary_dim), channels
        self.register_buffer("cos_sin", self._cos_sin(block_size, torch.device("cpu")), persistent=False)

    def _cos_sin(self, length: int, device: torch.device) -> Tensor:
        positions = torch.arange(length, device=device, dtype=torch.float32)
        angles = positions.unsqueeze(-1) * inverse_frequencies(self.channels, self.base, device)
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: channel i pairs with i + channels/2
        return torch.stack([angles.cos(), angles.sin()])  # (2, length, channels), float32

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        end = offset + q.shape[-2]
        if self.cos_sin.shape[1] < end or self.cos_sin.dtype != torch.float32 or self.cos_sin.device != q.device:
            self.cos_sin = self._cos_sin(max(self.block_size, 2 * end), q.device)
        cos, sin = self.cos_sin[:, offset:end]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        rotated, rest = x[..., : self.channels].float(), x[..., self.channels:]
        x1, x2 = rotated.chunk(2, dim=-1)
        rotated = (rotated * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated
