"""The one interface every positional scheme implements (DESIGN.md, "Positional schemes").

The model asks a scheme for an absolute embedding, a rotation of q and k, or an additive logits
bias (per-distance table or full grid); a scheme overrides only the hooks it needs. The ``i``
queries are the last ``i`` of ``j`` key positions: query ``x`` sits at ``j - i + x``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def is_count(value: object, least: int = 1) -> bool:
    """Whether ``value`` is an int (not a bool) ``>= least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_model_sizes(**sizes: object) -> None:
    """Raises ValueError naming ``model.<key>`` for a size that is not a positive int."""
    for key, value in sizes.items():
        if not is_count(value):
            raise ValueError(f"model.{key} must be a positive int, got {value!r}")


def check_sizes(i: int, j: int) -> None:
    """Raises ValueError unless ``i`` and ``j`` are ints ``>= 0`` with ``j >= i``."""
    for name, value in (("i", i), ("j", j)):
        if not is_count(value, 0):
            raise ValueError(f"{name} must be an int >= 0 (a number of positions), got {name}={value!r}")
    if j < i:
        raise ValueError(f"j (key positions) must be >= i (query positions), got i={i}, j={j}: "
                         "the queries are the last i of the j key positions")


def check_option(ok: bool, scheme: str, key: str, value: object, fix: str) -> None:
    """Raises ValueError naming ``pos.<key>``, its value and the ``fix`` unless ``ok``."""
    if not ok:
        raise ValueError(f"pos.{key}={value!r} is invalid for pos={scheme}: {fix}")


def toeplitz(table: Tensor, i: int, fill: float = 0.0) -> Tensor:
    """Expand a per-distance table ``(heads, j)`` into the causal bias ``(heads, i, j)``, contiguous:
    ``table[h, j - i + x - y]`` where ``y <= j - i + x``, else ``fill``; gathered from a strided view of
    the padded table (DESIGN.md, performance facts: an order of magnitude cheaper than fancy indexing)."""
    heads, j = table.shape
    # padded[h, m] = table[h, j - 1 - m] for m < j, then j - 1 fills (future keys).
    padded = torch.cat([table.flip(-1), table.new_full((heads, max(j - 1, 0)), fill)], dim=-1)
    windows = padded.unfold(-1, j, 1)  # (heads, j, j); window w holds query x' = j - 1 - w
    return windows[:, :i].index_select(1, torch.arange(i - 1, -1, -1, device=table.device))


class PositionalScheme(nn.Module):
    """Base class, built as ``Scheme(n_layer=, n_head=, n_embd=, block_size=, **options)`` from
    ``configs/pos/<name>.yaml``. ``name``: ``pos=<name>`` (by default the class name in lower case);
    ``shared``: one bias for every block, computed once per forward; ``max_length``: the longest
    sequence it encodes (None: unbounded). Raises ValueError if a model size is not a positive int.
    """

    name: str = "base"
    shared: bool = False
    max_length: int | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = cls.__dict__.get("name", cls.__name__.lower())

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int) -> None:
        super().__init__()
        check_model_sizes(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)
        self.n_layer, self.n_head, self.n_embd, self.block_size = n_layer, n_head, n_embd, block_size

    @classmethod
    def options(cls) -> list[str]:
        """The scheme's options, each a ``pos.<key>``: its constructor's arguments besides the model sizes."""
        sizes = ("n_layer", "n_head", "n_embd", "block_size")
        return [key for key in inspect.signature(cls).parameters if key not in sizes]

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={getattr(self, key)}" for key in self.options() if hasattr(self, key))

    def absolute(self, t: int, offset: int = 0) -> Tensor | None:
        """Absolute embedding ``(t, n_embd)`` for positions ``offset .. offset + t - 1``, or None."""
        return None

    def rotate(self, q: Tensor, k: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
        """The new ``q, k (B, H, t, D)`` at positions ``offset .. offset + t - 1``, rotated (or not)."""
        return q, k

    def table(self, layer: int, j: int) -> Tensor | None:
        """Per-distance bias ``(n_head, j)`` for distances ``0 .. j-1`` in block ``layer``, or None."""
        return None

    def bias(self, layer: int, i: int, j: int) -> Tensor | None:
        """Additive logits bias ``(n_head, i, j)`` for block ``layer`` (default: the :meth:`table`'s
        :func:`toeplitz`), or None. Raises ValueError from :func:`check_sizes`."""
        check_sizes(i, j)
        table = self.table(layer, j)
        return None if table is None else toeplitz(table, i)

    def biases(self, i: int, j: int) -> list[Tensor | None]:
        """:meth:`bias` of every block (a ``shared`` scheme computes it once and repeats it)."""
        return self._per_block(self.bias, i, j)

    def tables(self, j: int) -> list[Tensor | None]:
        """:meth:`table` of every block (a ``shared`` scheme computes it once and repeats it)."""
        return self._per_block(self.table, j)

    def _per_block(self, hook, *sizes: int) -> list[Tensor | None]:
        if self.shared:
            return [hook(0, *sizes)] * self.n_layer
        return [hook(layer, *sizes) for layer in range(self.n_layer)]
