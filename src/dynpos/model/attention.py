"""Causal self-attention ``softmax(q kᵀ / sqrt(d) + bias + causal) v`` on paths that agree to float32
rounding (``fused``: :mod:`dynpos.model.fused`; ``sdpa`` with one float mask; ``eager``, the
reference; ``flex``), the KV cache, and the one function that picks the path, :func:`choose_attention`.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

from dynpos.model.fused import table_attention

PATHS = ("auto", "fused", "sdpa", "eager", "flex")
AUTO_EAGER_MAX = 64  # up to this length auto trains a learned table on eager, measured faster there

log = logging.getLogger(__name__)
_reported: set[str] = set()


def check_attn(attn: str, key: str = "model.attn") -> None:
    """Raises ValueError, naming config key ``key``, unless ``attn`` is one of :data:`PATHS`."""
    if attn not in PATHS:
        raise ValueError(f"{key}={attn!r} is not one of {', '.join(PATHS)}")


class AttnChoice(NamedTuple):
    """:func:`choose_attention`'s ``path`` and ``reason``; ``fallback``: worse than asked for (logged)."""

    path: str
    reason: str
    fallback: bool = False


def choose_attention(attn: str, *, bias: str, learned: bool, device: torch.device | str, grad: bool,
                     cached: bool, dropout: float, length: int) -> AttnChoice:
    """Decide the attention path: the one place that does (DESIGN.md, Attention; ``auto``'s rules:
    README, "The model" and, for dropout -> eager, "Compiled models, the path decision, threads and
    GPUs (issue 11)"; each choice's ``reason``; off the CPU ``auto`` is ``sdpa``, unmeasured).

    ``attn`` is ``model.attn``; ``bias`` what the scheme gives: ``none``, ``table`` (per distance,
    ``(H, j)``) or ``grid`` (``(H, i, j)``, FIRE); ``learned``: it has trainable parameters;
    ``grad``: ``torch.is_grad_enabled()``; ``cached``: fewer queries than keys (a KV cache);
    ``dropout``: the attention dropout that applies; ``length``: the key positions ``j``. Each fallback
    is logged once per reason (logger ``dynpos.model.attention``, WARNING), not while Dynamo traces.

    Raises:
        ValueError: for an unknown ``attn`` or ``bias``, or ``flex`` with gradients on the CPU
            (torch has no CPU FlexAttention backward).
    """
    check_attn(attn)
    if bias not in ("none", "table", "grid"):
        raise ValueError(f"bias={bias!r} is not one of none, table, grid")
    device = torch.device(device).type
    if attn == "flex" and grad and device == "cpu":
        raise ValueError("model.attn=flex cannot train on CPU (torch has no CPU FlexAttention backward): "
                         "train with model.attn=auto or sdpa; flex serves evaluation and generation")
    where = ("the scheme has no per-distance table" if bias != "table" else
             "a KV cache (queries are not the keys)" if cached else
             f"the fused kernel is CPU-only, tensors are on {device}" if device != "cpu" else None)
    if attn not in ("fused", "auto"):
        choice = AttnChoice(attn, "asked for")
    elif where is not None:
        choice = AttnChoice("sdpa", f"model.attn={attn}: {where}; using sdpa", attn == "fused")
    elif attn == "auto" and grad and not learned:
        choice = AttnChoice("sdpa", "auto: fixed table in training: grad-free sdpa mask")
    elif dropout > 0:
        choice = AttnChoice("eager", f"model.attn={attn}: the fused CPU kernel has no dropout "
                            f"(model.dropout={dropout:g}); training on eager, O(n^2) memory: "
                            "set model.dropout=0 for the fused path", True)
    elif attn == "auto" and grad and length <= AUTO_EAGER_MAX:
        choice = AttnChoice("eager", f"auto: learned table at {length} <= {AUTO_EAGER_MAX} positions "
                            "trains faster on eager")
    else:
        choice = AttnChoice("fused", "asked for" if attn == "fused" else "auto: per-distance table on the CPU")
    if choice.fallback and not torch.compiler.is_compiling() and choice.reason not in _reported:
        _reported.add(choice.reason)
        log.warning("attention fallback: %s", choice.reason)
    return choice


def causal_mask(bias: Tensor | None, i: int, j: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Fold the causal mask into a float mask: ``(1, heads, i, j)`` (``(1, 1, i, j)`` for ``bias``
    None) holding ``bias (heads, i, j)`` (or 0) where key ``y <= j - i + x``, ``-inf`` above."""
    future = torch.ones(i, j, dtype=torch.bool, device=device).triu(j - i + 1)
    base = bias if bias is not None else torch.zeros(1, i, j, device=device, dtype=dtype)
    return base.to(dtype).masked_fill(future, float("-inf")).unsqueeze(0)


class KVCache:
    """Each block's keys and values ``(B, n_head, length, head_dim)`` (None before the first step), and
    the blocks' bias ``tables`` that the GPT keeps for decoding without gradients."""

    def __init__(self, n_layer: int) -> None:
        self.blocks: list[tuple[Tensor, Tensor] | None] = [None] * n_layer
        self.tables: list[Tensor | None] | None = None

    @property
    def length(self) -> int:
        """Positions cached so far, read from the last block: it appends last, so inside a forward every
        block reads the length before that forward (the offset of its new positions)."""
        return 0 if self.blocks[-1] is None else self.blocks[-1][0].shape[-2]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``(B, H, t, D)`` keys and values to block ``layer``; return all of them so far."""
        if self.blocks[layer] is not None:
            k = torch.cat([self.blocks[layer][0], k], dim=-2)
            v = torch.cat([self.blocks[layer][1], v], dim=-2)
        self.blocks[layer] = k, v
        return k, v


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Reference attention: ``q (B, H, i, D)``, ``k, v (B, H, j, D)``, float ``mask`` broadcast to ``(B, H, i, j)``."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + mask
    weights = F.dropout(torch.softmax(scores.float(), dim=-1).to(q.dtype), dropout_p)
    return weights @ v


def _flex_table(q: Tensor, k: Tensor, v: Tensor, table: Tensor, shift: Tensor) -> Tensor:
    def score_mod(score, b, h, q_idx, kv_idx):
        distance = q_idx + shift - kv_idx
        return torch.where(distance >= 0, score + table[h, distance.clamp(min=0)], float("-inf"))

    return torch_flex_attention(q, k, v, score_mod=score_mod)


def _flex_grid(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, shift: Tensor) -> Tensor:
    def score_mod(score, b, h, q_idx, kv_idx):
        if bias is not None:
            score = score + bias[h, q_idx, kv_idx]
        return torch.where(kv_idx <= q_idx + shift, score, float("-inf"))

    return torch_flex_attention(q, k, v, score_mod=score_mod)


_compiled_flex: dict = {}  # filled on first use: Dynamo traces a dict, not functools.cache


def flex_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor | None, bias: Tensor | None) -> Tensor:
    """Causal FlexAttention ``(B, H, i, D)`` of ``q (B, H, i, D)`` (the last ``i`` of ``j`` positions),
    ``k, v (B, H, j, D)``, adding ``table (H, m >= j)`` at distance ``j - i + q_idx - kv_idx``, or
    ``bias (H, i, j)``, or neither. Compiled once per kind, ``dynamic=True``, with ``j - i`` a 0-d
    tensor (a symbolic int fails Inductor's CPU lowering in torch 2.13; an int recompiles per length).
    """
    if not _compiled_flex:
        _compiled_flex.update({fn: torch.compile(fn, dynamic=True) for fn in (_flex_table, _flex_grid)})
    shift = torch.tensor(k.shape[-2] - q.shape[-2], device=q.device)
    if table is not None:
        return _compiled_flex[_flex_table](q, k, v, table, shift)
    return _compiled_flex[_flex_grid](q, k, v, bias, shift)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention whose logits receive the positional scheme's bias; ``dropout``
    applies to the attention weights and the residual, ``bias`` to the Linear layers."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos, layer: int, path: str, bias: Tensor | None,
                cache: KVCache | None = None) -> Tensor:
        """``x (B, t, n_embd) -> (B, t, n_embd)`` on attention ``path``, which reads ``bias``: a table
        ``(H, j)`` (fused, flex), a grid ``(H, i, j)`` (flex) or a float mask ``(1, H, i, j)`` (sdpa, eager),
        None for plain causal attention. ``pos`` rotates q and k (RoPE)."""
        q, k, v = rearrange(self.c_attn(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        q, k = pos.rotate(q, k, cache.length if cache is not None else 0)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        i, j = q.shape[-2], k.shape[-2]
        dropout_p = self.dropout if self.training else 0.0
        if path == "fused":
            y = table_attention(q, k, v, bias)
        elif path == "flex" and bias is not None and bias.dim() == 2:  # a per-distance table
            y = flex_attention(q, k, v, bias, None)
        elif path == "flex":  # a grid (H, i, j) or none
            y = flex_attention(q, k, v, None, bias)
        elif path == "sdpa" and bias is None and i == j:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            if bias is None and (path == "eager" or i > 1):
                bias = causal_mask(None, i, j, x.device, q.dtype)
            attend = eager_attention if path == "eager" else F.scaled_dot_product_attention
            y = attend(q, k, v, bias, dropout_p)
        return self.resid_dropout(self.c_proj(rearrange(y, "b h t d -> b t (h d)")))
