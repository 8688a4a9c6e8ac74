"""Causal self-attention with an additive positional bias, and the KV cache.

``softmax(q k^T / sqrt(d) + bias + causal) v`` on one of several paths that compute the same
function (tests prove it to float32 rounding):

* ``auto`` (default): ``fused`` when the scheme gives a per-distance table, the queries are the
  keys (no cache) and the tensors are on the CPU, except ``eager`` to train a learned table on
  up to ``AUTO_EAGER_MAX`` (64) positions, where it is faster; ``sdpa`` otherwise (the rules in
  ``GPT._layer_inputs``);
* ``fused``: :func:`dynpos.model.fused.table_attention`, the CPU flash kernel forward with a
  hand-written backward that reduces the bias gradient straight into the per-distance table;
* ``sdpa``: PyTorch's ``scaled_dot_product_attention`` with the bias and the causal mask folded
  into one float mask (bias-free attention uses ``is_causal`` and the flash kernel);
* ``eager``: explicit matmul, softmax, matmul: the reference;
* ``flex``: FlexAttention (compiled) with a ``score_mod`` that reads the per-distance table, so
  the ``(heads, i, j)`` grid is never built. On CPU, torch 2.13 has no FlexAttention backward:
  there the path serves inference (evaluation, generation) and refuses to train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from typing import NamedTuple

from dynpos.model.fused import table_attention

PATHS = ("auto", "fused", "sdpa", "eager", "flex")


class AttnInputs(NamedTuple):
    """What one block's attention receives from the positional scheme, for the path chosen.

    ``path``: the resolved path (``fused``, ``sdpa``, ``eager`` or ``flex``); ``mask``: the folded float
    mask ``(1, H, i, j)`` (sdpa/eager; None: plain causal); ``table``: per-distance bias ``(H, j)``
    (fused/flex); ``bias``: full bias ``(H, i, j)`` (flex, schemes without a table).
    """

    path: str
    mask: Tensor | None = None
    table: Tensor | None = None
    bias: Tensor | None = None


def flex_available() -> bool:
    """Whether this torch has FlexAttention (``torch.nn.attention.flex_attention``)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def causal_mask(bias: Tensor | None, i: int, j: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Fold the causal mask into a float attention mask.

    Args:
        bias: ``(heads, i, j)`` additive bias, or None.
        i, j: query and key lengths, the queries being the last ``i`` of the ``j`` positions.

    Returns:
        ``(1, heads, i, j)`` (``(1, 1, i, j)`` without bias): ``bias`` where key ``y <= j - i + x``,
        ``-inf`` above that diagonal.
    """
    future = torch.ones(i, j, dtype=torch.bool, device=device).triu(j - i + 1)
    base = bias if bias is not None else torch.zeros(1, i, j, device=device, dtype=dtype)
    return base.to(dtype).masked_fill(future, float("-inf")).unsqueeze(0)


@dataclass
class KVCache:
    """Keys and values of every block, for decoding one token at a time.

    ``keys[layer]``/``values[layer]``: ``(B, n_head, length, head_dim)`` or None before the first step.
    ``tables``: the per-distance bias tables ``(n_head, m)`` of every block, for table schemes
    decoding without gradients: computed once for ``m >= block_size`` distances and sliced at
    each step, instead of running the positional MLP on ``0 .. length-1`` at every token.
    """

    n_layer: int
    keys: list[Tensor | None] = field(default_factory=list)
    values: list[Tensor | None] = field(default_factory=list)
    tables: list[Tensor] | None = None

    def __post_init__(self) -> None:
        self.keys = [None] * self.n_layer
        self.values = [None] * self.n_layer

    @property
    def length(self) -> int:
        """Number of positions cached so far."""
        return 0 if self.keys[0] is None else self.keys[0].shape[-2]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``(B, H, t, D)`` keys and values to block ``layer``; return all of them so far."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=-2)
            v = torch.cat([self.values[layer], v], dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Reference attention: ``q (B, H, i, D)``, ``k, v (B, H, j, D)``, float ``mask`` broadcastable to ``(B, H, i, j)``."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + mask
    weights = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), dropout_p)
    return weights @ v


_compiled_flex = None


def flex_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor | None, bias: Tensor | None) -> Tensor:
    """FlexAttention with the causal mask and a ``score_mod`` reading the positional bias.

    Args:
        q: ``(B, H, i, D)``; ``k``, ``v``: ``(B, H, j, D)``; queries are the last ``i`` of ``j``.
        table: per-distance bias ``(H, j)`` (read at ``j - i + q_idx - kv_idx``), or None.
        bias: full bias ``(H, i, j)`` for schemes without a table, or None.

    Raises:
        ValueError: on CPU when a gradient is needed (torch has no CPU FlexAttention backward).
    """
    from torch.nn.attention.flex_attention import flex_attention as flex

    global _compiled_flex
    i, j = q.shape[-2], k.shape[-2]
    shift = j - i

    def score_mod(score, b, h, q_idx, kv_idx):
        if table is not None:
            score = score + table[h, (q_idx + shift - kv_idx).clamp(min=0)]
        elif bias is not None:
            score = score + bias[h, q_idx, kv_idx]
        return torch.where(kv_idx <= q_idx + shift, score, float("-inf"))

    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, table, bias)
    )
    if needs_grad and q.device.type == "cpu":
        raise ValueError(
            "model.attn=flex cannot train on CPU (torch has no CPU FlexAttention backward): "
            "train with model.attn=sdpa; flex serves evaluation and generation"
        )
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex, dynamic=False)
    return _compiled_flex(q, k, v, score_mod=score_mod)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention whose logits receive the positional scheme's bias.

    Args:
        n_embd: model width; n_head: number of heads (``n_embd % n_head == 0``).
        dropout: attention and residual dropout probability.
        bias: whether the Linear layers have biases.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos, layer: int, inputs: AttnInputs, cache: KVCache | None = None) -> Tensor:
        """``x (B, t, n_embd) -> (B, t, n_embd)``; ``inputs`` carries the path and the bias for it,
        ``pos`` rotates q and k (RoPE)."""
        q, k, v = rearrange(self.c_attn(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        # This block's own cache length: cache.length reads block 0, which has already appended.
        offset = cache.keys[layer].shape[-2] if cache is not None and cache.keys[layer] is not None else 0
        q, k = pos.rotate(q, k, offset)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        i, j = q.shape[-2], k.shape[-2]
        dropout_p = self.dropout if self.training else 0.0
        path, mask = inputs.path, inputs.mask
        if path == "fused":
            y = table_attention(q, k, v, inputs.table, dropout_p)
        elif path == "flex":
            y = flex_attention(q, k, v, inputs.table, inputs.bias)
        elif path == "eager":
            if mask is None:
                mask = causal_mask(None, i, j, x.device, q.dtype)
            y = eager_attention(q, k, v, mask, dropout_p)
        elif mask is None and i == j:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            if mask is None and i > 1:
                mask = causal_mask(None, i, j, x.device, q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        return self.resid_dropout(self.c_proj(rearrange(y, "b h t d -> b t (h d)")))
