"""Fixed sinusoidal absolute position embedding, computed for any position.

Source: Vaswani et al. (2017), "Attention Is All You Need", section 3.5; the sinusoids, not the
token embeddings, are scaled (by ``n_embd ** -0.5``), as in x-transformers' scaled sinusoidal embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynpos.positional.base import PositionalScheme, check_option


def inverse_frequencies(dim: int, base: float, device: torch.device | None = None) -> Tensor:
    """``base^(-2i/dim)`` for ``i = 0 .. ceil(dim/2) - 1``: float32, radians per position (also RoPE's)."""
    exponents = torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim
    return base ** -exponents


class Sinusoidal(PositionalScheme):
    """Sinusoidal absolute embedding (``pos=sinusoidal``) of wavelength ``base`` (the paper's 10000) and
    amplitude ``scale`` (None: ``n_embd ** -0.5``). Raises ValueError if ``base <= 1`` or ``scale <= 0``."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, *,
                 base: float = 10000.0, scale: float | None = None) -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        check_option(isinstance(base, (int, float)) and base > 1, self.name, "base", base,
                     "the wavelength base must be a number > 1 (the paper uses 10000)")
        check_option(scale is None or (isinstance(scale, (int, float)) and scale > 0), self.name, "scale", scale,
                     "use a positive amplitude, or null for n_embd ** -0.5")
        self.base = float(base)
        self.scale = float(scale) if scale is not None else n_embd ** -0.5
        # Built on the CPU, moved with the model; absolute() recomputes it if the model is not float32.
        self.register_buffer("inv_freq", inverse_frequencies(n_embd, self.base), persistent=False)

    def absolute(self, t: int, offset: int = 0) -> Tensor:
        """``(t, n_embd)``: ``scale`` times sin (even channels), cos (odd) of ``p * base^(-2i/n_embd)``
        at positions ``p = offset .. offset + t - 1``; in float32, returned in the model's dtype."""
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            inv_freq = inverse_frequencies(self.n_embd, self.base, inv_freq.device)
        positions = torch.arange(offset, offset + t, device=inv_freq.device, dtype=torch.float32)
        angles = positions.unsqueeze(-1) * inv_freq  # (t, ceil(n_embd / 2))
        embedding = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # sin, cos interleaved
        return (self.scale * embedding[:, : self.n_embd]).to(self.inv_freq.dtype)
