"""Fused causal attention with a learnable per-distance (Toeplitz) bias, for CPU training.

:func:`table_attention` computes

    out = softmax(q kᵀ / sqrt(D) + T + causal) v,        T[h, x, y] = table[h, x - y]  (y <= x)

and its gradients for ``q``, ``k``, ``v`` *and* ``table`` without ever holding a ``(B, H, n, n)``
tensor, nor the ``(H, n, n)`` bias in the autograd graph: it saves ``q, k, v, out``, the row
log-sum-exp and the ``(H, 2n - 1)`` padded table, O(B·H·n·D) memory as in FlashAttention.

Forward
    PyTorch's CPU flash kernel ``aten::_scaled_dot_product_flash_attention_for_cpu`` takes an
    additive float mask together with ``is_causal=True`` (and then still skips the key blocks
    above the diagonal) and returns the natural log-sum-exp ``lse`` of each row's scaled, biased
    logits; it gives no gradient for the mask. It is called per chunk of ``FWD_CHUNK`` query
    rows ``x0 .. x1-1``, twice: keys ``x0 .. x1-1`` (a square block, ``is_causal=True``) and keys
    ``0 .. x0-1`` (all visible, no causal flag), each with its slice of the bias built from the
    detached table (strided ``unfold`` of the reversed, ``-inf``-padded table, then a contiguous
    gather). The two partial softmaxes merge exactly: ``out = lerp(o₂, o₁, sigmoid(l₁ - l₂))``,
    ``lse = logaddexp(l₁, l₂)``. Against one call with the whole ``(1, H, n, n)`` mask this is
    faster at every length (B=8 H=4 D=32, 2 threads, idle: 4.4 vs 4.8 ms at n = 256, 37.5 vs
    47.9 at 1024, 134 vs 182 at 2048): the whole mask costs page faults at every allocation,
    and its memory. Bias-free causal flash attention: 3.4, 28.6, 81 ms.

Backward (recompute from the log-sum-exp: FlashAttention, Dao et al. 2022, arXiv:2205.14135)
    In chunks of ``ROW_CHUNK`` query rows ``x0 .. x1-1`` against keys ``0 .. x1-1`` only (the
    blocks above the diagonal are skipped), and in groups of batch elements so that a block of
    ``(group · H, c, x1)`` stays near ``BLOCK_ELEMS``, all in float32 (float64 for float64 input):

    * ``P  = exp([q·s, -lse] · [k, 1]ᵀ + T)``: ``-lse`` rides in an extra GEMM column. The
      arguments are clamped at ``floor = 2.5 · ln(eps)`` (-39.8 in float32) and weights at or
      just above ``exp(floor)`` (4.9e-18) set to exactly 0 (``F.threshold_``), far below the
      rounding of a row of weights that sums to 1. ATen's vectorised ``exp`` took 31 ns per
      element for arguments below -87 (masked ``-inf`` entries; biases that fall by more than
      87 nats, as ALiBi's steep heads do over long distances) against 0.45 ns in range, and
      the tiny weights it returns make the products after it denormal, also slow: on a freshly
      initialised micro DPB model at block 1024 one layer's backward took 4x another's. With
      the floor the backward of a whole step went from 934 to about 320 ms (4 layers, 2
      threads), the step from 2.38x to 1.2-1.3x NoPE; masked keys keep exactly zero gradient;
    * ``dS = P ⊙ ([dO, -Δ] · [v, 1]ᵀ)``, ``Δ = rowsum(dO ⊙ O)``: likewise ``-Δ``;
    * ``dV += Pᵀ dO``, ``dQ = dS (k·s)``, ``dK += dSᵀ (q·s)``, ``s = 1/sqrt(D)``;
    * ``dtable[h, r] = Σ_b Σ_{x - y = r} dS[b, h, x, y]``: ``dS`` summed over the batch lands in a
      buffer with ``c`` zero columns on the left; a strided view whose step is the row stride + 1
      turns its diagonals into columns, and one ``sum`` reduces them ("skew" trick).

    Five GEMMs and six elementwise passes (bias add, clamp, exp, threshold, product, batch sum)
    per block. ``[q·s, -lse]``, ``[k, 1]``, ``[dO, -Δ]`` and ``[v, 1]`` are each written in
    one pass; the GEMMs read ``q·s``, ``k`` and ``dO`` as their first ``D`` columns, and ``dQ``
    is scaled by ``s`` once at the end.

    Measured alternative, rejected: the flash *backward* kernel
    (``aten::_scaled_dot_product_flash_attention_for_cpu_backward``, given the whole mask) for
    dq, dk, dv plus the same chunked pass for the table gradient alone. That pass needs the P
    and dP GEMMs and all the elementwise work anyway, so the flash backward only stands in for
    the three cheap GEMMs (dV, dQ, dK) and costs more than they do: fwd + bwd 20-25 % slower
    (B=8 H=4 D=32, 2 workers, medians of 7 interleaved runs: n=256 288 vs 246 ms, n=1024 1025
    vs 809 ms, n=2048 2397 vs 1837 ms, on a loaded machine). Checked again with the floor:
    the flash backward with the mask alone takes 61 % of this whole backward at n = 256
    (3.86 vs 6.31 ms) and 94 % at n = 1024 (55.5 vs 58.8 ms), B=4 H=4 D=32, 1 thread, idle.

    Also measured and rejected: ``softmax`` of the block in place of clamp, ``exp`` and threshold
    (slower), and ``torch.compile(dynamic=True)`` of the block's elementwise steps (16.7 s to
    compile, then 145 against 129 ms at n = 1024, B=8, 2 threads).

Threads
    ``WORKERS = 1`` (default) runs forward and backward on the caller's thread, each ATen op
    with ATen's own OpenMP threads. ``WORKERS = k`` splits the batch (or, for a batch smaller
    than ``k``, the heads) into ``k`` parts, runs one part per Python thread with ATen set to
    one intra-op thread (:func:`_run_parts`), and concatenates (the table gradient: sum over
    batch parts). The chunked code issues a few hundred ATen ops, each an OpenMP fork/join:
    when other processes share the cores every join waits for a descheduled thread, and the
    split is faster; on an idle machine the split loses, as the idle OpenMP team of the
    caller spins (libgomp: ``GOMP_SPINCOUNT``, 300,000 by default) on the cores its workers
    need. One-off measurement, training steps of the micro model, DPB over NoPE, block 256,
    batch 8, 2 threads, medians of 16 interleaved steps: idle, 1.06 (``WORKERS=1``) vs 1.46
    (``WORKERS=2``); with two busy processes on the 2 cores, 11.8 vs 1.9 (NoPE 3x slower
    itself). With one thread
    (``torch.set_num_threads(1)``, the advice for a shared machine) the two are the same.

Performance (2-core CPU, torch 2.13; ``scripts/bench_attention.py``, B=8 H=4 D=32, fwd + bwd)
    Medians of 7 interleaved runs over bias-free causal flash SDPA at n = 64 / 256 / 1024 / 2048,
    2 threads, idle machine: this path 2.34 / 1.60 / 1.46 / 1.65x (with the Python-thread split
    5.27 / 2.73 / 1.45 / 1.45x); the generic SDPA kernel with the model's grad-requiring mask
    2.30 / 2.35 / 5.08 / 7.08x; eager 1.67 / 2.11 / 5.89 / 8.25x. The others also hold
    O(B·H·n²) memory. The script also prints forward and backward apart. The other figures in
    this docstring are one-off measurements made while choosing the design (method stated with
    each); these and ``scripts/bench.py`` are the comparisons to rerun.

    Found on the way: a ``flip`` of the overlapping ``unfold`` view comes back column-major for
    partial rows, and adding such a bias cost about 5x a contiguous one, hence the gather in
    :func:`_rows`; ``baddbmm_`` into a strided slice falls back to one GEMM call per batch item,
    hence ``+= bmm``; the augmented ``[q, -lse]`` GEMM column costs about what the separate
    subtraction pass it replaces did.

Limits
    * No dropout: the CPU flash kernel refuses it ("Currently do not support dropout > 0").
      :func:`dynpos.model.attention.choose_attention` trains a model with ``dropout > 0`` on
      ``eager`` instead (O(n²) memory, eager speed) and logs that choice once.
    * Self-attention only (``i == j``, causal, top-left aligned): no KV-cache offset; the model
      keeps its regular path when ``i != j``.
    * float32, float64, bfloat16 and float16 on CPU. Low-precision inputs get a float32 bias and
      log-sum-exp, a float32 backward, and gradients cast back to their dtypes. Other devices are
      refused; empty sizes (the flash kernel dies with SIGFPE on ``n == 0``) use the eager formula.
    * Not twice differentiable (the backward is an opaque op).

torch.compile
    Forward and backward are custom operators (``torch.library.custom_op``:
    ``dynpos::table_attention_fwd`` returns ``out`` and the log-sum-exp,
    ``dynpos::table_attention_bwd`` the four gradients; ``register_autograd`` joins them, and
    fake implementations give Dynamo and Inductor the shapes, dtypes and strides), so a compiled
    model keeps the fused path inside one graph, with no graph break.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["table_attention", "table_mask"]

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

#: Query rows per forward chunk (two flash calls each: the keys before it, its diagonal block).
FWD_CHUNK = 256
#: Largest bias block, in elements, that one forward chunk builds: long sequences use fewer rows
#: per chunk (down to 32), so evaluation memory stays close to bias-free attention.
FWD_BIAS_ELEMS = 1 << 21
#: Query rows per backward chunk (also the inner size of the dV and dK GEMMs).
ROW_CHUNK = 64
#: Target size, in elements, of one backward block ``(batch group · H, c, keys)``.
BLOCK_ELEMS = 1 << 20
#: Parts the batch (or the heads) is split into, each run on its own Python thread with
#: single-threaded ATen ops. 1 (default): one part on the caller's thread, ATen's own threading;
#: faster on an idle machine. ``torch.get_num_threads()``: faster when other processes load the
#: cores (see the module docstring, Threads).
WORKERS = 1
#: The backward's attention weights below ``eps ** EXP_FLOOR_POWER`` of the compute dtype
#: (4.9e-18 in float32) become exactly 0 (module docstring, Backward).
EXP_FLOOR_POWER = 2.5

_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)
_pool_lock = threading.Lock()


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
    if n == 0:
        return table.new_zeros(1, table.shape[0], 0, 0)
    padded = _padded(table, n)
    return _rows(padded, n, 0, n, n).unsqueeze(0)


def _reference(q: Tensor, k: Tensor, v: Tensor, table: Tensor) -> Tensor:
    """Eager formula, for empty sizes only (the flash kernel cannot take them). Same contract."""
    n = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + table_mask(table, n, q.dtype)
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


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
    if need_t:
        # batch-summed dS of a chunk goes to z[:, :c, c:c + L]; the c left columns stay 0
        z = q.new_zeros((H, ROW_CHUNK, n + ROW_CHUNK), dtype=f)
        stride = z.stride(1)
    for x0 in range(0, n, ROW_CHUNK):
        x1 = min(x0 + ROW_CHUNK, n)
        c, L = x1 - x0, x1
        bias = _rows(padded, n, x0, x1, L)                                          # (H, c, L)
        group = max(1, min(B, BLOCK_ELEMS // (H * c * L)))
        for b0 in range(0, B, group):
            b1 = min(b0 + group, B)
            g, nb = slice(b0 * H, b1 * H), b1 - b0
            p = torch.bmm(qa[g, x0:x1], ka[g, :L].transpose(1, 2))                  # S·s - lse
            p.view(nb, H, c, L).add_(bias)
            F.threshold_(p.clamp_min_(floor).exp_(), cutoff, 0.0)                   # P
            ds = torch.bmm(da[g, x0:x1], va[g, :L].transpose(1, 2))                 # dP - Δ
            ds.mul_(p)                                                              # dS
            # dv/dk: bmm into a fresh tensor, then add: baddbmm_ into the strided slice falls
            # back to one small GEMM call per batch item
            if need_v:
                dv[g, :L] += torch.bmm(p.transpose(1, 2), do3[g, x0:x1])
            if need_q:
                torch.bmm(ds, k3[g, :L], out=dq[g, x0:x1])                          # dQ / s
            if need_k:
                dk[g, :L] += torch.bmm(ds.transpose(1, 2), qs[g, x0:x1])
            if need_t:
                zc = z[:, :c, ROW_CHUNK:ROW_CHUNK + L]
                if b0 == 0:
                    torch.sum(ds.view(nb, H, c, L), 0, out=zc)
                else:
                    zc += ds.view(nb, H, c, L).sum(0)
        if need_t:
            # Skew: diag[h, e, i] = z[h, i, ROW_CHUNK - c + 1 + e + i] (row stride + 1 per i) is
            # key y = 1 + e + i - c of query x0 + i, so x - y = x1 - 1 - e for every i: summing
            # over i gives the diagonal sums. Keys y < 0 fall in the zero left columns.
            diag = z.as_strided((H, L, c), (z.stride(0), 1, stride + 1), ROW_CHUNK - c + 1)
            rev[:, n - L:] += diag.sum(-1)
    shape = (B, H, n, D)
    return (dq.mul_(scale).view(shape) if need_q else None, dk.view(shape) if need_k else None,
            dv.view(shape) if need_v else None, rev.flip(-1) if need_t else None)


def _forward(q: Tensor, k: Tensor, v: Tensor, padded: Tensor) -> tuple[Tensor, Tensor]:
    """Flash forward in query chunks of ``FWD_CHUNK`` rows; see the module docstring.

    Args:
        q, k, v: ``(B, H, n, D)``; padded: ``(H, 2n - 1)`` from :func:`_padded`.

    Returns:
        ``out (B, H, n, D)`` in the dtype of ``q`` and ``lse (B, H, n)`` float32 (float64 for
        float64 inputs): the natural log-sum-exp of each row's scaled, biased logits.
    """
    B, H, n, D = q.shape
    if n <= FWD_CHUNK:
        return _FLASH(q, k, v, 0.0, True, attn_mask=_rows(padded, n, 0, n, n).unsqueeze(0))
    chunk = max(min(32, FWD_CHUNK), min(FWD_CHUNK, FWD_BIAS_ELEMS // (H * n)))
    out = _out_layout(q)
    lse = q.new_empty((B, H, n), dtype=padded.dtype)
    merge = padded.dtype  # merge the two partial softmaxes at >= float32
    for x0 in range(0, n, chunk):
        x1 = min(x0 + chunk, n)
        bias = _rows(padded, n, x0, x1, x1).unsqueeze(0)                    # (1, H, c, x1)
        qc = q[:, :, x0:x1]
        # keys x0 .. x1-1: a square causal block, top-left aligned as is_causal expects
        o2, l2 = _FLASH(qc, k[:, :, x0:x1], v[:, :, x0:x1], 0.0, True, attn_mask=bias[..., x0:])
        if x0 == 0:
            out[:, :, x0:x1], lse[:, :, x0:x1] = o2, l2
            continue
        # keys 0 .. x0-1: all visible, no causal mask
        o1, l1 = _FLASH(qc, k[:, :, :x0], v[:, :, :x0], 0.0, False, attn_mask=bias[..., :x0])
        # softmax over both key sets: weights e^l1 / (e^l1 + e^l2) = sigmoid(l1 - l2)
        w1 = torch.sigmoid(l1 - l2).unsqueeze(-1)
        out[:, :, x0:x1] = torch.lerp(o2.to(merge), o1.to(merge), w1)
        torch.logaddexp(l1, l2, out=lse[:, :, x0:x1])
    return out, lse


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers - 1`` threads (the caller is the last worker); rebuilt
    after a fork, whose child inherits the pool object but not its threads."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
            _pool = (os.getpid(), workers, ThreadPoolExecutor(workers - 1, thread_name_prefix="dynpos-fused"))
        return _pool[2]


def _split(n_parts: int, B: int, H: int) -> tuple[int, list[slice]]:
    """``(dim, slices)``: split the batch (dim 0) into at most ``n_parts`` near-equal slices, or
    the heads (dim 1) when there are fewer batch items than both parts and heads."""
    dim, size = (0, B) if B >= n_parts or B >= H else (1, H)
    n_parts = max(1, min(n_parts, size))
    bounds = [size * i // n_parts for i in range(n_parts + 1)]
    return dim, [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def _run_parts(fn, parts: list[tuple]) -> list:
    """``[fn(*part) for part in parts]``: one part on the caller's thread with ATen's own
    threading, or one Python thread per part with single-threaded ATen ops (see ``WORKERS``).

    ``torch.set_num_threads`` sets the calling thread's OpenMP thread count and the count that
    threads started later inherit; both are set back on return.
    """
    if len(parts) == 1:
        with torch.no_grad():
            return [fn(*parts[0])]
    previous = torch.get_num_threads()
    pool = _executor(len(parts))

    def work(part):
        torch.set_num_threads(1)
        with torch.no_grad():
            return fn(*part)

    futures = []
    try:
        futures = [pool.submit(work, part) for part in parts[1:]]
        first = work(parts[0])
        return [first] + [future.result() for future in futures]
    finally:
        wait(futures)  # on an error too: no part may outlive the single-thread setting
        torch.set_num_threads(previous)


def _out_layout(q: Tensor) -> Tensor:
    """An empty ``(B, H, n, D)`` output laid out as ``(B, n, H, D)`` (what the flash kernel writes
    for the model's q; ``rearrange(out, "b h t d -> b t (h d)")`` is then free). Real and fake
    implementations both allocate through here: Inductor asserts the strides it was promised."""
    B, H, n, D = q.shape
    return q.new_empty((B, n, H, D)).transpose(1, 2)


def _parts(slices: tuple[int, list[slice]], *tensors: Tensor, per_head: Tensor | None = None) -> list[tuple]:
    """Slice each ``(B, H, ...)`` tensor along the split dim, and ``per_head`` (``(H, ...)``)
    along the heads when the split is over heads."""
    dim, pieces = slices
    parts = []
    for part in pieces:
        index = (part,) if dim == 0 else (slice(None), part)
        extra = () if per_head is None else (per_head if dim == 0 else per_head[part],)
        parts.append((*(t[index] for t in tensors), *extra))
    return parts


@torch.library.custom_op("dynpos::table_attention_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, table: Tensor) -> tuple[Tensor, Tensor]:
    """``(out (B, H, n, D) in q's dtype, laid out by _out_layout; lse (B, H, n) contiguous, float32
    (float64 for float64 q))``; ``table`` is ``(H, n)``."""
    B, H, n, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    padded = _padded(table.to(compute), n)
    split = _split(WORKERS, B, H)
    results = _run_parts(_forward, _parts(split, q, k, v, per_head=padded))
    dim = split[0]
    out = torch.cat([r[0] for r in results], dim) if len(results) > 1 else results[0][0]
    lse = torch.cat([r[1] for r in results], dim) if len(results) > 1 else results[0][1]
    laid = _out_layout(q)
    if out.stride() != laid.stride():
        out = laid.copy_(out)
    return out, lse.contiguous()


@_fwd_op.register_fake
def _(q, k, v, table):
    B, H, n, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    return _out_layout(q), q.new_empty((B, H, n), dtype=compute)


@torch.library.custom_op("dynpos::table_attention_bwd", mutates_args=())
def _bwd_op(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, lse: Tensor, table: Tensor,
            need_q: bool, need_k: bool, need_v: bool, need_table: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dq, dk, dv (B, H, n, D)`` in their inputs' dtypes and ``dtable (H, n)`` in the table's,
    contiguous; a gradient not needed comes back as an empty ``(0,)`` tensor."""
    B, H, n, _ = q.shape
    need = (need_q, need_k, need_v, need_table)
    compute = lse.dtype
    padded = _padded(table.to(compute), n)
    split = _split(WORKERS, B, H)
    dim = split[0]
    results = _run_parts(_backward, [(*p, need) for p in _parts(split, q, k, v, out, dout, lse, per_head=padded)])
    grads = []
    for i, like in enumerate((q, k, v, table)):
        pieces = [r[i] for r in results]
        if not need[i]:
            grads.append(like.new_empty(0))
            continue
        if len(pieces) == 1:
            g = pieces[0]
        elif i < 3:
            g = torch.cat(pieces, dim)
        else:  # table: per-head pieces, or partial sums over batch parts
            g = torch.cat(pieces, 0) if dim == 1 else torch.stack(pieces).sum(0)
        grads.append(g.to(like.dtype).contiguous())
    return tuple(grads)


@_bwd_op.register_fake
def _(q, k, v, out, dout, lse, table, need_q, need_k, need_v, need_table):
    return tuple(like.new_empty(like.shape if need else (0,))
                 for like, need in zip((q, k, v, table), (need_q, need_k, need_v, need_table)))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, table = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table)


def _backward_rule(ctx, dout: Tensor, _dlse: Tensor | None):
    """Autograd of the forward op: the chunked recompute backward, itself an opaque op (not
    twice differentiable)."""
    q, k, v, out, lse, table = ctx.saved_tensors
    need = tuple(bool(x) for x in ctx.needs_input_grad[:4])
    grads = _bwd_op(q, k, v, out, dout, lse, table, *need)
    return tuple(g if n else None for g, n in zip(grads, need))


_fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def table_attention(q: Tensor, k: Tensor, v: Tensor, table: Tensor) -> Tensor:
    """Causal self-attention with a per-distance additive bias, fused for CPU training.

    ``out = softmax(q kᵀ / sqrt(D) + T + causal) v`` with ``T[h, x, y] = table[h, x - y]``; equal
    (to float rounding) to ``eager_attention(q, k, v, causal_mask(toeplitz(table, n), n, n, ...))``,
    gradients for ``q``, ``k``, ``v`` and ``table`` included. Algorithm and sources: module docstring.
    Registered as the custom ops ``dynpos::table_attention_fwd`` / ``_bwd`` (``torch.library``),
    so ``torch.compile`` keeps a model that calls it in one graph.

    Args:
        q, k, v: ``(B, H, n, D)`` on the CPU, one dtype among float32, float64, bfloat16,
            float16; queries and keys are the same ``n`` positions (self-attention, no KV-cache
            offset).
        table: ``(H, m)``, ``m >= n``: ``table[h, r]`` is the logit bias at distance
            ``r = query - key`` (only ``r < n`` is read). Any float dtype; its gradient comes
            back in its dtype. Typically the output of a positional MLP (DPB), so it may
            require grad.

    Returns:
        ``(B, H, n, D)`` in the dtype of ``q``. Empty sizes (``B == 0`` or ``n == 0``, where the
        flash kernel dies with SIGFPE) give the exact empty result through the eager formula.

    Raises:
        ValueError: on shapes that do not match the above (or ``D == 0``), mixed or unsupported
            q/k/v dtypes, a non-float table, or tensors off the CPU. There is no dropout (the
            CPU flash kernel has none): :func:`dynpos.model.attention.choose_attention` sends
            training with ``model.dropout > 0`` to another path and says so.
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
        return _reference(q, k, v, table)
    return _fwd_op(q, k, v, table)[0]
