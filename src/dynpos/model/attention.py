"""Causal self-attention with an additive positional bias, the KV cache, and the one function
that picks the attention path.

``softmax(q k^T / sqrt(d) + bias + causal) v`` on one of several paths that compute the same
function (tests prove it to float32 rounding):

* ``fused``: :func:`dynpos.model.fused.table_attention`, the CPU flash kernel forward with a
  hand-written backward that reduces the bias gradient straight into the per-distance table
  (a ``torch.library`` custom op: no graph break under ``torch.compile``);
* ``sdpa``: PyTorch's ``scaled_dot_product_attention`` with the bias and the causal mask folded
  into one float mask (bias-free attention uses ``is_causal`` and the flash kernel);
* ``eager``: explicit matmul, softmax, matmul: the reference;
* ``flex``: FlexAttention with a ``score_mod`` that reads the per-distance table, so the
  ``(heads, i, j)`` grid is never built; compiled once with dynamic shapes. On CPU, torch 2.13
  has no FlexAttention backward: there the path serves inference (evaluation, generation) and
  refuses to train.

``auto`` (the default) and every fallback are decided by :func:`choose_attention` alone, from
(requested path, scheme's bias, device, gradients, KV cache, dropout, length); the model, the
tests and ``scripts/bench.py`` all call it, and each fallback is logged once with its reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from dynpos.model.fused import table_attention

PATHS = ("auto", "fused", "sdpa", "eager", "flex")
#: Bias kinds a positional scheme gives attention (:func:`choose_attention`'s ``bias``).
BIAS_KINDS = ("none", "table", "grid")
#: Longest sequence for which ``auto`` trains a learned table (DPB) on ``eager`` rather than
#: ``fused``: attention alone, fwd + bwd, B=12 H=4 D=32, 2 threads, medians of 30:
#: n = 64 eager 1.9 ms vs fused 3.3 (bias-free causal SDPA 1.3), n = 96 5.8 vs 6.0,
#: n = 128 8.7 vs 7.5 (``scripts/bench_attention.py``).
AUTO_EAGER_MAX = 64

log = logging.getLogger(__name__)
_reported: set[str] = set()


class AttnChoice(NamedTuple):
    """What :func:`choose_attention` decided.

    ``path``: ``fused``, ``sdpa``, ``eager`` or ``flex``; ``reason``: why, in one line;
    ``fallback``: True when the path is slower or heavier than the one asked for (or than
    ``auto``'s fast path) because of a limit, the case that is logged.
    """

    path: str
    reason: str
    fallback: bool = False


def _report(reason: str) -> None:
    """Log a fallback once per distinct reason."""
    if reason not in _reported:
        _reported.add(reason)
        log.warning("attention fallback: %s", reason)


def choose_attention(attn: str, *, bias: str, learned: bool, device: torch.device | str, grad: bool,
                     cached: bool, dropout: float, length: int) -> AttnChoice:
    """Decide the attention path: the one place that does (DESIGN.md, Attention).

    Args:
        attn: the requested path, ``model.attn``: one of :data:`PATHS`.
        bias: what the positional scheme gives: ``none`` (no logits bias: NoPE, RoPE, learned,
            sinusoidal), ``table`` (a per-distance table ``(H, j)``: DPB, ALiBi, T5, KERPLE)
            or ``grid`` (a full ``(H, i, j)`` bias: FIRE).
        learned: whether the bias has trainable parameters (DPB, T5, KERPLE, FIRE; not ALiBi).
        device: where the tensors are.
        grad: whether autograd records (``torch.is_grad_enabled()``).
        cached: whether the queries are fewer than the keys (decoding through a KV cache).
        dropout: the attention dropout that applies (``model.dropout`` in training, else 0).
        length: number of key positions ``j``.

    Returns:
        :class:`AttnChoice`. The rules: ``eager`` and ``sdpa`` are taken as asked. ``auto`` on the
        CPU sends a table without a cache to ``fused`` when the table is learned or no gradient
        is needed (the chunked forward keeps memory linear in the length), except to train a
        learned table on at most :data:`AUTO_EAGER_MAX` positions, where ``eager`` is faster;
        a fixed table in training (ALiBi) is faster as a grad-free ``sdpa`` mask; everything
        else goes to ``sdpa`` (on CUDA too: the GPU paths are unmeasured). The fused kernel has
        no dropout: training a table with ``dropout > 0`` falls back to ``eager`` (O(n²) memory).
        ``fused`` asked for where it cannot run (no table, a cache, not the CPU) falls back to
        ``sdpa``; ``flex`` without FlexAttention in this torch, to ``sdpa``. Each fallback is
        logged once per distinct reason (logger ``dynpos.model.attention``, level WARNING);
        while Dynamo traces, nothing is logged (a log call would break the graph):
        :func:`dynpos.model.compile_model` reports the training and evaluation choices first.

    Raises:
        ValueError: for an unknown ``attn`` or ``bias``, and for ``flex`` with gradients on
            the CPU (torch has no CPU FlexAttention backward).
    """
    if attn not in PATHS:
        raise ValueError(f"model.attn={attn!r} is not one of {', '.join(PATHS)}")
    if bias not in BIAS_KINDS:
        raise ValueError(f"bias={bias!r} is not one of {', '.join(BIAS_KINDS)}")
    cpu = torch.device(device).type == "cpu"
    choice = AttnChoice(attn, "asked for")
    if attn == "flex":
        if not flex_available():
            choice = AttnChoice("sdpa", "model.attn=flex: this torch has no FlexAttention; using sdpa", True)
        elif grad and cpu:
            raise ValueError(
                "model.attn=flex cannot train on CPU (torch has no CPU FlexAttention backward): "
                "train with model.attn=auto or sdpa; flex serves evaluation and generation"
            )
    elif attn in ("fused", "auto"):
        where = ("the scheme has no per-distance table" if bias != "table" else
                 "a KV cache (queries are not the keys)" if cached else
                 f"the fused kernel is CPU-only, tensors are on {torch.device(device).type}" if not cpu else None)
        if where is not None:
            choice = AttnChoice("sdpa", f"model.attn={attn}: {where}; using sdpa", attn == "fused")
        elif attn == "auto" and grad and not learned:
            choice = AttnChoice("sdpa", "auto: fixed table in training: grad-free sdpa mask")
        elif dropout > 0:
            choice = AttnChoice("eager", f"model.attn={attn}: the fused CPU kernel has no dropout "
                                f"(model.dropout={dropout:g}); training on eager, O(n^2) memory: "
                                "set model.dropout=0 for the fused path", True)
        elif attn == "auto" and grad and length <= AUTO_EAGER_MAX:
            choice = AttnChoice("eager", f"auto: learned table at {length} <= {AUTO_EAGER_MAX} positions trains faster on eager")
        else:
            choice = AttnChoice("fused", "asked for" if attn == "fused" else "auto: per-distance table on the CPU")
    if choice.fallback and not torch.compiler.is_compiling():  # compile_model reports before compiling
        _report(choice.reason)
    return choice


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


def _flex_table(q: Tensor, k: Tensor, v: Tensor, table: Tensor, shift: Tensor) -> Tensor:
    """FlexAttention reading ``table[h, q_idx + shift - kv_idx]``, ``-inf`` for future keys."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    def score_mod(score, b, h, q_idx, kv_idx):
        distance = q_idx + shift - kv_idx
        return torch.where(distance >= 0, score + table[h, distance.clamp(min=0)], float("-inf"))

    return flex(q, k, v, score_mod=score_mod)


def _flex_grid(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, shift: Tensor) -> Tensor:
    """FlexAttention with a full ``(H, i, j)`` bias (or none) and the causal mask."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    def score_mod(score, b, h, q_idx, kv_idx):
        if bias is not None:
            score = score + bias[h, q_idx, kv_idx]
        return torch.where(kv_idx <= q_idx + shift, score, float("-inf"))

    return flex(q, k, v, score_mod=score_mod)


_compiled_flex: dict[str, object] = {}


def flex_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor | None, bias: Tensor | None) -> Tensor:
    """FlexAttention with the causal mask and a ``score_mod`` reading the positional bias.

    Compiled once per kind (table, grid) with ``dynamic=True``: the lengths are symbolic and the
    offset ``j - i`` of the queries reaches ``score_mod`` as a 0-d tensor (a symbolic int there
    fails Inductor's CPU lowering in torch 2.13, a plain int recompiles at every length), so
    generation compiles two graphs (the prompt, then one-token steps: Dynamo specialises size 1)
    instead of one per key length.

    Args:
        q: ``(B, H, i, D)``; ``k``, ``v``: ``(B, H, j, D)``; queries are the last ``i`` of ``j``.
        table: per-distance bias ``(H, m)``, ``m >= j`` (read at ``j - i + q_idx - kv_idx``), or None.
        bias: full bias ``(H, i, j)`` for schemes without a table, or None.

    Returns:
        ``(B, H, i, D)``.
    """
    kind = "table" if table is not None else "grid"
    if kind not in _compiled_flex:
        _compiled_flex[kind] = torch.compile(_flex_table if kind == "table" else _flex_grid, dynamic=True)
    shift = torch.tensor(k.shape[-2] - q.shape[-2], device=q.device)
    return _compiled_flex[kind](q, k, v, table if kind == "table" else bias, shift)


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
            y = table_attention(q, k, v, inputs.table)
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
