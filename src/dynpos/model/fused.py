"""Fused causal attention with a learnable per-distance (Toeplitz) bias, for CPU training.

:func:`table_attention` computes

    out = softmax(q kᵀ / sqrt(D) + T + causal) v,        T[h, x, y] = table[h, x - y]  (y <= x)

and its gradients for ``q``, ``k``, ``v`` *and* ``table`` without ever holding a
``(B, H, n, n)`` tensor, and without the ``(H, n, n)`` bias in the autograd graph.

Forward
    The ``(1, H, n, n)`` float bias is built from the detached table (one strided ``unfold`` of the
    flipped, ``-inf``-padded table plus one contiguous copy) and handed, together with
    ``is_causal=True``, to PyTorch's CPU flash kernel
    ``aten::_scaled_dot_product_flash_attention_for_cpu``, which accepts an additive mask with
    the causal flag, still skips the key blocks above the diagonal, and returns the row
    log-sum-exp ``lse`` (natural log, of the scaled and biased logits). Only ``q, k, v, out,
    lse`` and the ``(H, 2n - 1)`` padded table are saved: O(B·H·n·D) memory, as in FlashAttention.

Backward (recompute from the log-sum-exp, FlashAttention, Dao et al. 2022, arXiv:2205.14135)
    In chunks of ``c`` query rows ``x0 .. x1-1`` against keys ``0 .. x1-1`` only (the blocks above
    the diagonal are skipped), and in groups of batch elements so a chunk stays cache-sized:

    * ``P  = exp([q·s, -lse] · [k, 1]ᵀ + T)``  — the ``-lse`` rides in an extra GEMM column;
    * ``dS = P ⊙ ([dO, -Δ] · [v, 1]ᵀ)``, ``Δ = rowsum(dO ⊙ O)``  — likewise for ``-Δ``;
    * ``dV += Pᵀ dO``, ``dQ = dS (k·s)``, ``dK += dSᵀ (q·s)``, ``s = 1/sqrt(D)``;
    * ``d table[h, r] = Σ_b Σ_{x - y = r} dS[b, h, x, y]``: ``dS`` is summed over the batch into a
      row-padded ``(H, c, x1 + c)`` buffer whose diagonals are then columns of a strided view
      (row stride + 1), so one ``sum`` reduces them (the "skew" trick).

    Five GEMMs and four elementwise passes per chunk. Measured on the 2-core CPU this replaced
    (a) the flash backward kernel plus a separate chunked bias-gradient pass (two extra GEMMs and
    more passes: slower, see ``scripts/bench_attention.py`` and the module's report), and it is
    faster than the generic SDPA kernel with a grad-requiring mask and than eager attention.

Limits
    * ``dropout_p > 0``: the CPU flash kernel refuses dropout ("Currently do not support dropout
      > 0"), so the call falls back to eager attention with the bias (correct, O(n²) memory, the
      speed of the eager path). The default training configuration uses dropout 0.
    * Self-attention only (``i == j``, causal, top-left aligned): no KV cache offset; the model
      uses its regular path when ``i != j``.
    * dtypes float32, float64, bfloat16, float16 on CPU; other devices, and empty sizes (the flash
      kernel crashes on ``n == 0``), fall back to the eager formula. Low-precision inputs get a
      float32 bias and a float32 backward; gradients are cast back to the input dtypes.
    * Not twice differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["table_attention", "table_mask"]

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: Query rows per backward chunk (also the inner size of the dV and dK GEMMs).
ROW_CHUNK = 64
#: Target size, in elements, of one backward block ``(batch group · H, c, keys)``.
BLOCK_ELEMS = 1 << 20


def _padded(table: Tensor, n: int) -> Tensor:
    """``(H, 2n - 1)``: ``table[:, :n]`` reversed, then ``n - 1`` entries of ``-inf``.

    Window ``w`` of length ``n`` starting at ``n - 1 - x`` is row ``x`` of the causal bias:
    ``padded[n - 1 - x + y] = table[x - y]`` for ``y <= x`` and ``-inf`` for ``y > x``.
    """
    heads = table.shape[0]
    return torch.cat([table[:, :n].flip(-1), table.new_full((heads, n - 1), float("-inf"))], dim=-1)


def _rows(padded: Tensor, n: int, x0: int, x1: int, keys: int) -> Tensor:
    """Rows ``x0 .. x1-1``, keys ``0 .. keys-1`` of the causal bias, as a contiguous ``(H, x1-x0, keys)``.

    ``index_select`` with a reversed index rather than ``flip``: ``flip`` of this overlapping
    view comes back column-major, and adding a column-major bias costs several times more.
    """
    windows = padded.unfold(-1, n, 1)  # (H, n, n), window w holds row n - 1 - w
    rev = torch.arange(x1 - x0 - 1, -1, -1, device=padded.device)
    return windows[:, n - x1:n - x0, :keys].index_select(1, rev)


def table_mask(table: Tensor, n: int, dtype: torch.dtype | None = None) -> Tensor:
    """The causal Toeplitz bias as an additive float mask.

    Args:
        table: ``(H, m)`` with ``m >= n``; ``table[h, r]`` is the bias at distance ``r``.
        n: sequence length (queries = keys = ``n``).
        dtype: mask dtype (default: the table's).

    Returns:
        ``(1, H, n, n)`` contiguous, ``mask[0, h, x, y] = table[h, x - y]`` for ``y <= x`` and
        ``-inf`` above the diagonal. Differentiable with respect to ``table``.
    """
    table = table if dtype is None else table.to(dtype)
    padded = _padded(table, n)
    return _rows(padded, n, 0, n, n).unsqueeze(0)


def _reference(q: Tensor, k: Tensor, v: Tensor, table: Tensor, dropout_p: float) -> Tensor:
    """Eager formula, the fallback (dropout, other devices, empty sizes). Same contract."""
    n = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + table_mask(table, n, q.dtype)
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
              padded: Tensor, need: tuple[bool, bool, bool, bool]) -> tuple[Tensor | None, ...]:
    """Chunked recompute backward (see the module docstring).

    Args:
        q, k, v, out, dout: ``(B, H, n, D)``; lse: ``(B, H, n)`` from the flash forward;
        padded: ``(H, 2n - 1)`` from :func:`_padded` in the compute dtype;
        need: which of ``dq, dk, dv, dtable`` to compute.

    Returns:
        ``dq, dk, dv`` as ``(B, H, n, D)`` and ``dtable`` as ``(H, n)``, in the compute dtype
        (float64 for float64 inputs, float32 otherwise), None where not needed.
    """
    B, H, n, D = q.shape
    BH = B * H
    f = padded.dtype
    scale = D ** -0.5
    need_q, need_k, need_v, need_t = need
    q3, k3, v3, o3, do3 = (t.to(f).reshape(BH, n, D) for t in (q, k, v, out, dout))
    ones = q3.new_ones(BH, n, 1)
    qs = q3 * scale
    qa = torch.cat([qs, -lse.to(f).reshape(BH, n, 1)], dim=-1)                 # (BH, n, D+1)
    ka = torch.cat([k3, ones], dim=-1)
    da = torch.cat([do3, -(do3 * o3).sum(-1, keepdim=True)], dim=-1)
    va = torch.cat([v3, ones], dim=-1)
    ks = k3 * scale if need_q else None
    dq = torch.empty_like(q3) if need_q else None
    dk = torch.zeros_like(k3) if need_k else None
    dv = torch.zeros_like(v3) if need_v else None
    rev = q3.new_zeros(H, n) if need_t else None   # rev[:, n - 1 - r]: gradient at distance r
    for x0 in range(0, n, ROW_CHUNK):
        x1 = min(x0 + ROW_CHUNK, n)
        c, L = x1 - x0, x1
        bias = _rows(padded, n, x0, x1, L)                                          # (H, c, L)
        group = max(1, min(B, BLOCK_ELEMS // (H * c * L)))
        if need_t:
            # row-padded buffer: diagonals of z[:, :, c:] are columns of a stride (L + c + 1) view
            z = q3.new_zeros(H, c, L + c)
        for b0 in range(0, B, group):
            b1 = min(b0 + group, B)
            g, nb = slice(b0 * H, b1 * H), b1 - b0
            p = torch.bmm(qa[g, x0:x1], ka[g, :L].transpose(1, 2))                  # S·s - lse
            p.view(nb, H, c, L).add_(bias)
            p.exp_()                                                                # P
            ds = torch.bmm(da[g, x0:x1], va[g, :L].transpose(1, 2))                 # dP - Δ
            ds.mul_(p)                                                              # dS
            if need_v:
                dv[g, :L].baddbmm_(p.transpose(1, 2), do3[g, x0:x1])
            if need_q:
                torch.bmm(ds, ks[g, :L], out=dq[g, x0:x1])
            if need_k:
                dk[g, :L].baddbmm_(ds.transpose(1, 2), qs[g, x0:x1])
            if need_t:
                z[:, :, c:] += ds.view(nb, H, c, L).sum(0)
        if need_t:
            # view[h, e, i] = z[h, i, 1 + e + i]: key y = 1 + e + i - c of query x0 + i, so
            # x - y = x1 - 1 - e for every i; left-pad columns (y < 0) hold zeros.
            diag = z.as_strided((H, L, c), (c * (L + c), 1, L + c + 1), z.storage_offset() + 1)
            rev[:, n - L:] += diag.sum(-1)
    shape = (B, H, n, D)
    return (dq.view(shape) if need_q else None, dk.view(shape) if need_k else None,
            dv.view(shape) if need_v else None, rev.flip(-1) if need_t else None)


class _TableAttention(torch.autograd.Function):
    """Flash forward with the Toeplitz bias, chunked recompute backward; see the module docstring."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, table: Tensor) -> Tensor:
        n = q.shape[-2]
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        padded = _padded(table.detach().to(compute), n)
        mask = _rows(padded, n, 0, n, n).unsqueeze(0)                     # (1, H, n, n)
        out, lse = _FLASH(q, k, v, 0.0, True, attn_mask=mask)
        del mask
        ctx.save_for_backward(q, k, v, out, lse, padded)
        ctx.table_dtype = table.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor):
        q, k, v, out, lse, padded = ctx.saved_tensors
        dq, dk, dv, dt = _backward(q, k, v, out, dout, lse, padded, tuple(ctx.needs_input_grad[:4]))
        cast = lambda g, like: None if g is None else g.to(like)  # noqa: E731
        return cast(dq, q.dtype), cast(dk, k.dtype), cast(dv, v.dtype), cast(dt, ctx.table_dtype)


def table_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Causal self-attention with a per-distance additive bias, fused for CPU training.

    ``out = softmax(q kᵀ / sqrt(D) + T + causal) v`` with ``T[h, x, y] = table[h, x - y]``; equal
    (to float rounding) to ``eager_attention(q, k, v, causal_mask(toeplitz(table, n), n, n, ...))``,
    gradients for ``q``, ``k``, ``v`` and ``table`` included. Algorithm and sources: module docstring.

    Args:
        q, k, v: ``(B, H, n, D)``, one dtype among float32, float64, bfloat16, float16; queries
            and keys are the same ``n`` positions (self-attention, no KV-cache offset).
        table: ``(H, m)``, ``m >= n``: ``table[h, r]`` is the logit bias at distance
            ``r = query - key`` (only ``r < n`` is read). Any float dtype; its gradient comes
            back in its dtype. Typically the output of a positional MLP (DPB), so it may
            require grad.
        dropout_p: attention-weight dropout. ``> 0`` falls back to the eager formula (the CPU
            flash kernel has no dropout); apply ``0`` at evaluation, as for ``F.dropout``.

    Returns:
        ``(B, H, n, D)`` in the dtype of ``q``.

    Raises:
        ValueError: on shapes that do not match the above (or ``D == 0``), mixed q/k/v dtypes,
            or ``dropout_p`` outside ``[0, 1]``.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be (B, H, n, D) of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, n, D = q.shape
    if D == 0:
        raise ValueError("head dimension D must be > 0")
    if table.dim() != 2 or table.shape[0] != H or table.shape[1] < n:
        raise ValueError(f"table must be (H, m) with H={H} and m >= n={n}, got {tuple(table.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    table = table[:, :n]
    fused = (dropout_p == 0.0 and q.device.type == "cpu" and q.dtype in _DTYPES
             and table.is_floating_point() and q.numel() > 0)
    if not fused:
        return _reference(q, k, v, table, dropout_p)
    return _TableAttention.apply(q, k, v, table)
