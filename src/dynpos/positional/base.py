"""The one interface every positional scheme implements.

The model asks a scheme for at most three things (DESIGN.md, "Positional schemes"):

* ``absolute(t, offset)``: an embedding ``(t, n_embd)`` added to the token embeddings
  (learned, sinusoidal);
* ``rotate(q, k, offset)``: a rotation of queries and keys (RoPE);
* ``table(layer, j)`` or ``bias(layer, i, j)``: an additive attention-logit bias, either as a
  per-distance table ``(n_head, j)`` (DPB, ALiBi, T5, KERPLE: the bias depends only on the
  distance) or as the full grid ``(n_head, i, j)`` (FIRE, whose bias also depends on the
  query position).

A scheme that needs nothing says so by not overriding the hook: the defaults return ``None``
or the inputs unchanged, and the model skips the work. Positions follow the KV-cache
convention used throughout dynpos: ``i`` queries are the last ``i`` of ``j`` key positions,
so query ``x`` sits at absolute position ``j - i + x`` and the distance to key ``y`` is
``j - i + x - y`` (non-negative for every key a causal query can see).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def check_sizes(i: int, j: int) -> None:
    """Validate query/key lengths for a ``(heads, i, j)`` bias.

    Raises:
        ValueError: if ``i`` or ``j`` is not an integer, is negative, or ``j < i``
            (the queries must be the last ``i`` of the ``j`` key positions).
    """
    for name, value in (("i", i), ("j", j)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int number of positions, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {name}={value}")
    if j < i:
        raise ValueError(
            f"j (key positions) must be >= i (query positions), got i={i}, j={j}: "
            "the queries are the last i of the j key positions"
        )


def check_option(ok: bool, scheme: str, key: str, value: object, fix: str) -> None:
    """Refuse an invalid scheme option where it enters (at construction).

    Raises:
        ValueError: if not ``ok``, naming the Hydra key ``pos.<key>``, its value and the fix.
    """
    if not ok:
        raise ValueError(f"pos.{key}={value!r} is invalid for pos={scheme}: {fix}")


def toeplitz(table: Tensor, i: int) -> Tensor:
    """Expand a per-distance table into the causal bias grid.

    Args:
        table: ``(heads, j)``, ``table[h, r]`` the bias at distance ``r = 0 .. j-1``.
        i: number of queries, the last ``i`` of the ``j`` positions.

    Returns:
        ``(heads, i, j)`` with ``out[h, x, y] = table[h, j - i + x - y]`` wherever
        ``y <= j - i + x``; entries above the causal diagonal are 0 (the causal mask
        removes them). Built as a strided ``unfold`` view of the zero-padded table, which
        is an order of magnitude cheaper than fancy indexing (DESIGN.md, performance facts).
    """
    heads, j = table.shape
    # padded[h, m] = table[h, j - 1 - m] for m < j, then j - 1 zeros (future keys).
    padded = torch.cat([table.flip(-1), table.new_zeros(heads, j - 1)], dim=-1)
    windows = padded.unfold(-1, j, 1)  # (heads, j, j); window w holds query x' = j - 1 - w
    return windows[:, :i].flip(1)


class PositionalScheme(nn.Module):
    """Base class: a scheme overrides only the hooks it needs.

    Subclasses are built from ``configs/pos/<name>.yaml`` with the model's sizes filled in:
    ``Scheme(n_layer=..., n_head=..., n_embd=..., block_size=..., **options)``.

    Class attributes:
        name: the scheme's config name (``pos=<name>``).
        supports_cache: whether cached decoding reproduces a full forward pass.
        shared: whether every block uses the same bias (then computed once per forward).
        max_length: the longest sequence the scheme can encode (``None``: unbounded).
    """

    name: str = "base"
    supports_cache: bool = True
    shared: bool = False

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int) -> None:
        super().__init__()
        for key, value in (("n_layer", n_layer), ("n_head", n_head), ("n_embd", n_embd), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{key} must be a positive int, got {value!r} (building pos={self.name})")
        self.n_layer, self.n_head, self.n_embd, self.block_size = n_layer, n_head, n_embd, block_size

    @property
    def max_length(self) -> int | None:
        return None

    def absolute(self, t: int, offset: int = 0) -> Tensor | None:
        """Absolute embedding ``(t, n_embd)`` for positions ``offset .. offset + t - 1``, or None."""
        return None

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Rotate the new queries and keys ``(B, H, t, D)``, both at positions ``offset .. offset + t - 1``.

        Called before new keys enter the KV cache, so ``offset`` is the cache length.
        Both are returned unchanged by default.
        """
        return q, k

    def table(self, layer: int, j: int) -> Tensor | None:
        """Per-distance bias ``(n_head, j)`` for distances ``0 .. j-1`` in block ``layer``, or None."""
        return None

    def bias(self, layer: int, i: int, j: int) -> Tensor | None:
        """Additive logits bias ``(n_head, i, j)`` for block ``layer``, or None.

        The default expands :meth:`table` with :func:`toeplitz`; schemes whose bias depends
        on more than the distance override this instead.
        """
        check_sizes(i, j)
        table = self.table(layer, j)
        return None if table is None else toeplitz(table, i)

    def biases(self, i: int, j: int) -> list[Tensor | None]:
        """One bias per block; a scheme shared across blocks (``shared``) computes it once and repeats it."""
        if self.shared:
            return [self.bias(0, i, j)] * self.n_layer
        return [self.bias(layer, i, j) for layer in range(self.n_layer)]
