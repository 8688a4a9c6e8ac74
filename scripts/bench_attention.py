"""Benchmark causal attention with a learnable Toeplitz bias: forward + backward, CPU.

Variants, each timed as one forward and one backward (``out.backward(grad)``) of attention
alone, all gradients on (q, k, v and, where there is one, the per-distance table):

* ``causal``     bias-free ``F.scaled_dot_product_attention(is_causal=True)`` (flash kernel): the floor;
* ``table``      :func:`dynpos.model.fused.table_attention`;
* ``table_split`` the same with the batch split over one Python thread per torch thread
  (``fused.WORKERS = torch.get_num_threads()``; faster only when other processes load the cores);
* ``sdpa_mask``  ``F.scaled_dot_product_attention`` with the ``(1, H, n, n)`` bias mask that requires
  grad, built as the model builds it (the generic kernel: the model's ``sdpa`` path);
* ``eager``      ``eager_attention`` with ``causal_mask(toeplitz(table))``: the reference;
* ``compiled``   (``--compile``) ``torch.compile`` of the eager path (one compile per size, not timed).

Repetitions are interleaved (variant A, B, C, A, B, C, ...) so that load from other processes
falls on every variant alike; the table reports the medians of the forward and of the backward
alone, the median and minimum of their sum in ms, and that median's ratio to the ``causal`` row.

    python scripts/bench_attention.py                      # B=8 H=4 D=32, n = 256 1024 2048
    python scripts/bench_attention.py --sizes 1024 --reps 9 --threads 2 --compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from dynpos.model.attention import causal_mask, eager_attention
from dynpos.model import fused
from dynpos.model.fused import table_attention
from dynpos.positional.base import toeplitz


def interleaved(runs: dict, reps: int, after=None, warmup: int = 1) -> dict[str, list[float]]:
    """Time every callable in ``runs`` in interleaved rounds (A, B, C, A, B, C, ...).

    Each round calls every ``fn()`` once, each followed by ``after()`` if given
    (outside the timing); the first ``warmup`` rounds warm up (and compile) and are dropped.
    Interleaving makes load from other processes fall on every variant alike.

    Returns:
        name -> the ``reps`` wall-clock times in ms, in the order measured.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(warmup + reps):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if after is not None:
                after()
            if rep >= warmup:
                times[name].append(elapsed * 1e3)
    return times


def variants(q, k, v, table, compile_eager: bool) -> dict:
    """Name -> callable returning the attention output ``(B, H, n, D)``, graph attached."""
    n = q.shape[-2]

    def mask():  # the model's sdpa/eager paths build their mask this way
        return causal_mask(toeplitz(table, n), n, n, q.device, q.dtype)

    def eager():
        return eager_attention(q, k, v, mask())

    def split():  # fused with the batch split over Python threads (fused.WORKERS, module docstring)
        workers, fused.WORKERS = fused.WORKERS, torch.get_num_threads()
        try:
            return table_attention(q, k, v, table)  # the backward reuses the forward's split
        finally:
            fused.WORKERS = workers

    out = {
        "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "table": lambda: table_attention(q, k, v, table),
        "table_split": split,
        "sdpa_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask()),
        "eager": eager,
    }
    if compile_eager:
        out["compiled"] = torch.compile(eager)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--reps", type=int, default=7, help="interleaved timed repetitions per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(eager)")
    parser.add_argument("--skip", nargs="*", default=[], help="variants to leave out, e.g. eager")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, B={args.batch} H={args.heads} "
          f"D={args.head_dim} {args.dtype}, {args.reps} interleaved reps; ms (median, min: fwd + bwd); "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'n':>5} {'variant':<12} {'fwd':>8} {'bwd':>8} {'median':>9} {'min':>9} {'x causal':>9}")
    torch.manual_seed(0)
    for n in args.sizes:
        shape = (args.batch, args.heads, n, args.head_dim)
        q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
        table = torch.randn(args.heads, n, requires_grad=True)
        grad = torch.randn(shape, dtype=dtype)
        runs = variants(q, k, v, table, args.compile)
        phases = {name: ([], []) for name in runs if name not in args.skip}  # fwd ms, bwd ms

        def timed(name, fn):
            def run():
                start = time.perf_counter()
                out = fn()
                mid = time.perf_counter()
                out.backward(grad)
                phases[name][0].append((mid - start) * 1e3)
                phases[name][1].append((time.perf_counter() - mid) * 1e3)
            return run

        def reset():
            q.grad = k.grad = v.grad = table.grad = None

        times = interleaved({name: timed(name, runs[name]) for name in phases}, args.reps, after=reset)
        base = statistics.median(times["causal"]) if "causal" in times else float("nan")
        for name, ts in times.items():
            fwd, bwd = (statistics.median(p[-args.reps:]) for p in phases[name])  # warm-up dropped
            med = statistics.median(ts)
            print(f"{n:>5} {name:<12} {fwd:>8.1f} {bwd:>8.1f} {med:>9.1f} {min(ts):>9.1f} {med / base:>9.2f}",
                  flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f} (other processes on these cores skew timings)")


if __name__ == "__main__":
    main()
