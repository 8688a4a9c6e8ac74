"""Fused causal attention with a learnable per-distance (Toeplitz) bias, for CPU training.

:func:`table_attention` computes ``softmax(q kᵀ / sqrt(D) + T + causal) v``, ``T[h, x, y] =
table[h, x - y]``, and the gradients of ``q, k, v`` and ``table`` in O(B·H·n·D) memory,
recomputing from the log-sum-exp as FlashAttention does (Dao et al. 2022, arXiv:2205.14135).
Forward: PyTorch's CPU flash kernel takes the bias as a float mask with ``is_causal=True`` and
returns the log-sum-exp; per chunk of query rows it runs on the diagonal block (causal) and on the
keys before it, and the two partial softmaxes merge exactly (``lerp`` by ``sigmoid(l₁ - l₂)``,
``logaddexp``). Backward: chunks of query rows against the keys up to the diagonal, in float32
(float64 for float64 input), ``-lse`` and ``-Δ = -rowsum(dO ⊙ O)`` riding in an extra GEMM column;
the batch sum of ``dS`` is reduced along its diagonals into ``dtable`` through a strided "skew" view.

Design notes (one-off measurements on 2 CPU cores; ``scripts/bench_attention.py`` reruns them):
``exp`` arguments are clamped at ``2.5·ln(eps)`` and weights under its exp set to 0, as ATen's ``exp``
leaves its fast path below -87 and tiny weights go denormal (a micro DPB step's backward: 934 ->
320 ms). Measured slower, so rejected: the flash backward kernel plus a table-gradient pass (20-25 %),
``softmax`` for clamp-exp-threshold, ``torch.compile`` of the elementwise steps, ``flip`` for
``index_select`` (column-major: 5x slower to add), ``baddbmm_`` into a strided slice. ``WORKERS``
(Python threads): README, Performance.

Limits: no dropout (``choose_attention`` trains with it on ``eager``), no KV-cache offset, CPU only,
not twice differentiable. Forward and backward are ``torch.library`` custom ops with fake
implementations and registered autograd: ``torch.compile`` keeps them in one graph.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor, wait

import torch
import torch.nn.functional as F
from torch import Tensor

from dynpos.positional.base import toeplitz

__all__ = ["table_attention", "table_mask"]

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

FWD_CHUNK = 256  # query rows per forward chunk (two flash calls: the keys before it, its diagonal block)
FWD_BIAS_ELEMS = 1 << 21  # largest bias block of a forward chunk: long sequences take fewer rows (>= 32)
ROW_CHUNK = 64  # query rows per backward chunk (also the inner size of the dV and dK GEMMs)
BLOCK_ELEMS = 1 << 20  # target elements of one backward block (batch group · H, c, keys)
WORKERS = 1  # parts the batch (or heads) is split into, one Python thread each (module docstring)
EXP_FLOOR_POWER = 2.5  # backward weights below eps ** EXP_FLOOR_POWER of the compute dtype become 0


def table_mask(table: Tensor, n: int) -> Tensor:
    """The causal bias of ``table (H, m >= n)`` as a contiguous float mask ``(1, H, n, n)`` in the table's
    dtype: ``table[h, x - y]`` for ``y <= x``, ``-inf`` above; differentiable."""
    if n == 0:  # no gradient to the table, as for any empty attention
        return table.new_zeros(1, table.shape[0], 0, 0)
    return toeplitz(table[:, :n], n, float("-inf")).unsqueeze(0)


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor,
              table: Tensor, need: list[bool]) -> tuple[Tensor | None, ...]:
    """``dq, dk, dv (B, H, n, D)`` and ``dtable (H, n)`` in ``table``'s dtype; None where not ``need``ed."""
    B, H, n, D = q.shape
    BH = B * H
    f = table.dtype
    scale = D ** -0.5
    floor = EXP_FLOOR_POWER * math.log(torch.finfo(f).eps)  # -39.8 in float32, -90.1 in float64
    cutoff = math.exp(floor) * (1 + 1e-4)  # above exp(floor) and its rounding: those become 0
    need_q, need_k, need_v, need_t = need

    def augmented(t: Tensor, last: Tensor | float, mul: float = 1.0) -> Tensor:
        """``(BH, n, D + 1)`` in the compute dtype: ``[t · mul, last]``, one pass over ``t``."""
        a = q.new_empty((B, H, n, D + 1), dtype=f)
        torch.mul(t.to(f), mul, out=a[..., :D])  # widen first: q·s rounded to bf16 is not q·s
        a[..., D] = last
        return a.view(BH, n, D + 1)

    delta = (dout.to(f) * out.to(f)).sum(-1)                                       # Δ (B, H, n)
    qa = augmented(q, -lse.to(f), scale)                                           # [q·s, -lse]
    ka = augmented(k, 1.0)                                                         # [k, 1]
    da = augmented(dout, -delta)                                                   # [dO, -Δ]
    va = augmented(v, 1.0)                                                         # [v, 1]
    qs, k3, do3 = qa[..., :D], ka[..., :D], da[..., :D]
    dq = q.new_empty((BH, n, D), dtype=f) if need_q else None
    dk = q.new_zeros((BH, n, D), dtype=f) if need_k else None
    dv = q.new_zeros((BH, n, D), dtype=f) if need_v else None
    rev = q.new_zeros((H, n), dtype=f) if need_t else None   # rev[:, n - 1 - r]: gradient at distance r
    z = q.new_zeros((H, ROW_CHUNK, n + ROW_CHUNK), dtype=f) if need_t else None
    for x0 in range(0, n, ROW_CHUNK):
        x1 = min(x0 + ROW_CHUNK, n)
        c, L = x1 - x0, x1
        bias = toeplitz(table[:, :L], c, float("-inf"))                             # (H, c, L)
        group = max(1, min(B, BLOCK_ELEMS // (H * c * L)))
        for b0 in range(0, B, group):
            b1 = min(b0 + group, B)
            g, nb = slice(b0 * H, b1 * H), b1 - b0
            p = torch.bmm(qa[g, x0:x1], ka[g, :L].transpose(1, 2))                  # S·s - lse
            p.view(nb, H, c, L).add_(bias)
            F.threshold_(p.clamp_min_(floor).exp_(), cutoff, 0.0)                   # P
            ds = torch.bmm(da[g, x0:x1], va[g, :L].transpose(1, 2))                 # dP - Δ
            ds.mul_(p)                                                              # dS
            if need_v:
                dv[g, :L] += torch.bmm(p.transpose(1, 2), do3[g, x0:x1])
            if need_q:
                torch.bmm(ds, k3[g, :L], out=dq[g, x0:x1])                          # dQ / s
            if need_k:
                dk[g, :L] += torch.bmm(ds.transpose(1, 2), qs[g, x0:x1])
            if need_t:  # the batch sum of dS goes to z[:, :c, ROW_CHUNK:]; the left columns stay 0
                zc = z[:, :c, ROW_CHUNK:ROW_CHUNK + L]
                if b0 == 0:
                    torch.sum(ds.view(nb, H, c, L), 0, out=zc)
                else:
                    zc += ds.view(nb, H, c, L).sum(0)
        if need_t:
            # Skew: diag[h, e, i] = z[h, i, ROW_CHUNK - c + 1 + e + i] (row stride + 1 per i) is
            # key y = 1 + e + i - c of query x0 + i, so x - y = x1 - 1 - e for every i: summing
            # over i gives the diagonal sums. Keys y < 0 fall in the zero left columns.
            diag = z.as_strided((H, L, c), (z.stride(0), 1, z.stride(1) + 1), ROW_CHUNK - c + 1)
            rev[:, n - L:] += diag.sum(-1)
    shape = (B, H, n, D)
    return (dq.mul_(scale).view(shape) if need_q else None, dk.view(shape) if need_k else None,
            dv.view(shape) if need_v else None, rev.flip(-1) if need_t else None)


def _forward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, table: Tensor) -> None:
    """Chunked flash forward into ``out (B, H, n, D)`` (q's dtype) and ``lse (B, H, n)`` (``table``'s)."""
    H, n = q.shape[1:3]
    chunk = n if n <= FWD_CHUNK else max(min(32, FWD_CHUNK), min(FWD_CHUNK, FWD_BIAS_ELEMS // (H * n)))
    for x0 in range(0, n, chunk):
        x1 = min(x0 + chunk, n)
        bias = toeplitz(table[:, :x1], x1 - x0, float("-inf")).unsqueeze(0)      # (1, H, c, x1)
        qc = q[:, :, x0:x1]
        # keys x0 .. x1-1: a square causal block, top-left aligned as is_causal expects
        o2, l2 = _FLASH(qc, k[:, :, x0:x1], v[:, :, x0:x1], 0.0, True, attn_mask=bias[..., x0:])
        if x0 == 0:
            out[:, :, x0:x1], lse[:, :, x0:x1] = o2, l2
            continue
        # keys 0 .. x0-1: all visible, no causal mask
        o1, l1 = _FLASH(qc, k[:, :, :x0], v[:, :, :x0], 0.0, False, attn_mask=bias[..., :x0])
        w1 = torch.sigmoid(l1 - l2).unsqueeze(-1)  # e^l1 / (e^l1 + e^l2)
        out[:, :, x0:x1] = torch.lerp(o2.to(table.dtype), o1.to(table.dtype), w1)  # merged at >= float32
        torch.logaddexp(l1, l2, out=lse[:, :, x0:x1])


def _parts(*tensors: Tensor, per_head: Tensor) -> tuple[int, list[list[Tensor]]]:
    """``(dim, parts)``: the ``(B, H, ...)`` tensors in ``<= WORKERS`` parts along the batch, or the heads if fewer."""
    B, H = tensors[0].shape[:2]
    dim, size = (0, B) if B >= WORKERS or B >= H else (1, H)
    n_parts = max(1, min(WORKERS, size))
    bounds = [size * i // n_parts for i in range(n_parts + 1)]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        heads = per_head if dim == 0 else per_head[a:b]  # a part of the heads takes their rows of per_head
        parts.append([t.narrow(dim, a, b - a) for t in tensors] + [heads])
    return dim, parts


@functools.cache
def _pool(pid: int, threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads, one per process id: a forked child does not inherit the threads."""
    return ThreadPoolExecutor(threads, thread_name_prefix="dynpos-fused")


def _run_parts(fn, parts: list[tuple]) -> list:
    """``[fn(*part) for part in parts]`` without grad, one Python thread per part (ATen single-threaded)."""
    if len(parts) == 1:
        with torch.no_grad():
            return [fn(*parts[0])]
    pool = _pool(os.getpid(), len(parts) - 1)
    previous = torch.get_num_threads()

    def work(part):
        torch.set_num_threads(1)
        with torch.no_grad():
            return fn(*part)

    futures = []
    try:
        futures = [pool.submit(work, part) for part in parts[1:]]
        return [work(parts[0])] + [future.result() for future in futures]
    finally:
        wait(futures)  # on an error too: no part may outlive the single-thread setting
        torch.set_num_threads(previous)


def _fwd_outputs(q: Tensor) -> tuple[Tensor, Tensor]:
    """The forward's empty ``out (B, H, n, D)``, laid out ``(B, n, H, D)`` as flash writes it, and ``lse
    (B, H, n)`` in the compute dtype (float64 for float64 q, else float32): real and fake op alike."""
    B, H, n, D = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((B, n, H, D)).transpose(1, 2), q.new_empty((B, H, n), dtype=compute)


@torch.library.custom_op("dynpos::table_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    out, lse = _fwd_outputs(q)
    _, parts = _parts(q, k, v, out, lse, per_head=table.to(lse.dtype))
    _run_parts(_forward, parts)
    return out, lse


@_fwd_op.register_fake
def _(q, k, v, table):
    return _fwd_outputs(q)


@torch.library.custom_op("dynpos::table_attention_bwd", mutates_args=())
def _bwd_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, table: Tensor,
            need: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dq, dk, dv, dtable`` in their inputs' dtypes; one not ``need``ed is empty ``(0,)``."""
    dim, parts = _parts(q, k, v, out, dout, lse, per_head=table.to(lse.dtype))
    results = _run_parts(_backward, [part + [need] for part in parts])

    def join(i: int, like: Tensor) -> Tensor:
        pieces = [r[i] for r in results]
        if len(pieces) == 1:  # one part: no copy
            g = pieces[0]
        elif i == 3 and dim == 0:  # the table's partial sums over batch parts
            g = torch.stack(pieces).sum(0)
        else:  # q, k, v along the split; the table's per-head pieces along heads
            g = torch.cat(pieces, dim if i < 3 else 0)
        return g.to(like.dtype).contiguous()

    return tuple(join(i, like) if need[i] else like.new_empty(0) for i, like in enumerate((q, k, v, table)))


@_bwd_op.register_fake
def _(q, k, v, out, dout, lse, table, need):
    return tuple(like.new_empty(like.shape if n else (0,)) for like, n in zip((q, k, v, table), need))


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:3], output[0], output[1], inputs[3])


def _backward_rule(ctx, dout: Tensor, _dlse: Tensor | None):
    q, k, v, out, lse, table = ctx.saved_tensors
    need = [bool(x) for x in ctx.needs_input_grad[:4]]
    grads = _bwd_op(q, k, v, out, dout, lse, table, need)
    return tuple(g if n else None for g, n in zip(grads, need))


_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def table_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor) -> Tensor:
    """Causal self-attention ``(B, H, n, D)`` with a per-distance bias, fused for CPU training.

    ``q, k, v``: ``(B, H, n, D)`` CPU tensors of one dtype, float32, float64, bfloat16 or float16
    (low precision computes in float32); ``table``: ``(H, m >= n)``, any float dtype, the logit bias
    at distance ``r = query - key``. Empty sizes (where the flash kernel dies) take the eager formula.

    Raises:
        ValueError: on other shapes (or ``D == 0``), mixed or other dtypes, or tensors off the CPU.
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
    if q.dtype not in _DTYPES or not table.is_floating_point():
        raise ValueError(f"table_attention takes q, k, v in {_DTYPES} and a float table, "
                         f"got {q.dtype} and {table.dtype}")
    if q.device.type != "cpu" or table.device.type != "cpu":
        raise ValueError(f"table_attention is a CPU kernel, got q on {q.device} and the table on "
                         f"{table.device}: use model.attn=auto, sdpa or flex there")
    table = table[:, :n]
    if q.numel() == 0:
        scores = (q @ k.transpose(-2, -1)) * D ** -0.5 + table_mask(table.to(q.dtype), n)
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
    return _fwd_op(q, k, v, table)[0]
