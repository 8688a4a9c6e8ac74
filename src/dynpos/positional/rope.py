"""RoPE: rotary position embedding of queries and keys.

Source: Su et al. (2021), "RoFormer: Enhanced Transformer with Rotary Position Embedding".
Channel pair ``i`` of a query or key at position ``p`` is rotated by the angle ``p * theta_i``,
``theta_i = base^(-2i/d)``; since rotations compose, ``q_p . k_p'`` depends on ``p - p'`` only,
and no bias or absolute embedding is needed.

Pairing: the *rotate-half* layout (GPT-NeoX, LLaMA as released in Hugging Face), which pairs channel
``i`` with channel ``i + d/2`` of the rotated part, rather than the paper's interleaved ``(2i, 2i+1)``
pairs. The two are the same function up to a fixed permutation of the q/k channels (which the
learned projection absorbs); rotate-half needs only slices and one concatenation.

Partial rotation (GPT-NeoX's ``rotary_pct``): only the first ``rotary_dim * head_dim`` channels of
each head rotate; the rest pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dynpos.positional.base import PositionalScheme, check_option
from dynpos.positional.sinusoidal import inverse_frequencies


def rotate_half(x: Tensor) -> Tensor:
    """``(..., d) -> (..., d)``: ``[x1, x2] -> [-x2, x1]`` with ``x1, x2`` the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RoPE(PositionalScheme):
    """Rotary position embedding (``pos=rope``): rotates the new queries and keys in every block.

    The cos/sin tables (float32, ``(positions, rotary channels)``) are cached in non-persistent
    buffers covering ``block_size`` positions, and grow (to the next power of two) when a longer
    sequence or a deeper KV cache asks for more.

    Args:
        n_layer, n_head, n_embd, block_size: the model's sizes (filled in by the model).
        base: wavelength base (10000 in the paper); must be > 1.
        rotary_dim: fraction of each head's channels that rotate, in ``(0, 1]``; the resulting
            channel count ``round(rotary_dim * head_dim)`` must be even.

    Raises:
        ValueError: if the head dimension ``n_embd // n_head`` is odd, ``base <= 1``, or
            ``rotary_dim`` is outside ``(0, 1]`` or gives an odd number of channels.
    """

    name = "rope"

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, *,
                 base: float = 10000.0, rotary_dim: float = 1.0) -> None:
        super().__init__(n_layer, n_head, n_embd, block_size)
        head_dim = n_embd // n_head
        if head_dim % 2:
            raise ValueError(
                f"pos=rope rotates channel pairs, but the head dimension model.n_embd / model.n_head = "
                f"{n_embd} / {n_head} = {head_dim} is odd: choose n_embd and n_head with an even quotient"
            )
        check_option(isinstance(base, (int, float)) and base > 1, self.name, "base", base,
                     "the wavelength base must be a number > 1 (the paper uses 10000)")
        check_option(isinstance(rotary_dim, (int, float)) and 0 < rotary_dim <= 1, self.name, "rotary_dim",
                     rotary_dim, "it is the fraction of each head's channels that rotate: choose a value in (0, 1]")
        channels = round(rotary_dim * head_dim)
        check_option(channels >= 2 and channels % 2 == 0, self.name, "rotary_dim", rotary_dim,
                     f"it gives {channels} of the {head_dim} head channels, which must be an even number >= 2: "
                     f"choose a fraction f with f * {head_dim} even")
        self.base, self.rotary_dim, self.channels = float(base), float(rotary_dim), channels
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(block_size, torch.device("cpu"))

    def extra_repr(self) -> str:
        return f"base={self.base:g}, rotary channels={self.channels}"

    def _build(self, length: int, device: torch.device) -> None:
        """Fill the cos/sin caches ``(length, channels)`` in float32 on ``device``."""
        inv_freq = inverse_frequencies(self.channels, self.base, device)  # (channels / 2,)
        angles = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(-1) * inv_freq
        angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: channel i pairs with i + channels/2
        self.cos, self.sin = angles.cos(), angles.sin()

    def _tables(self, offset: int, t: int, device: torch.device) -> tuple[Tensor, Tensor]:
        end = offset + t
        if self.cos.shape[0] < end or self.cos.dtype != torch.float32 or self.cos.device != device:
            self._build(max(self.block_size, 1 << max(end - 1, 0).bit_length()), device)
        return self.cos[offset:end], self.sin[offset:end]

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Rotate ``q, k (B, H, t, head_dim)`` at positions ``offset .. offset + t - 1``.

        Computed in float32 and returned in the inputs' dtype; the channels past ``channels``
        are returned unchanged.
        """
        cos, sin = self._tables(offset, q.shape[-2], q.device)
        return self._apply_rotation(q, cos, sin), self._apply_rotation(k, cos, sin)

    def _apply_rotation(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        rotated, rest = x[..., : self.channels].float(), x[..., self.channels:]
        rotated = (rotated * cos + rotate_half(rotated) * sin).to(x.dtype)
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated
