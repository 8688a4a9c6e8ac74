"""The prepared device check (issue 11): attention paths against eager, the training-step grid, and
GPT-2 small's tokens/s and peak memory, on one device, in one run.

1. **Paths.** For every attention path that runs on the device (``fused`` on the CPU only;
   ``flex`` trains only on CUDA, forward-only on the CPU), in float32 and bfloat16: output and the
   gradients of ``q``, ``k``, ``v`` and the per-distance table against a float64 eager
   reference built from the same leaves. A row passes when each maximum error is within
   ``tol · max(1, max|reference|)`` (float32: 1e-4, bfloat16: 3e-2).
2. **Grid.** One training step (forward + backward + AdamW, bfloat16 autocast) per (block,
   scheme, path, compiled), for dpb / nope / alibi / rope on the ``auto`` path (plus ``dpb/flex``
   on CUDA), with and without :func:`dynpos.model.compile_model`; tokens per step fixed
   (``--tokens``, the batch is ``tokens // block``). Median step time, tokens/s, ratio to NoPE
   at the same block and compile setting, and peak memory (CUDA: ``max_memory_allocated``).
3. **GPT-2 small** (``configs/model/gpt2.yaml``, block 1024, compiled): DPB against learned
   absolute positions, tokens/s and peak memory (the issue's target: DPB >= 0.9x learned).

Rows run in this order until ``--budget-s`` is spent; the rest are listed as skipped. Exit status
1 when a path check fails. ``--device cpu --tiny`` runs the same code at toy sizes (a test).

    python scripts/gpu_check.py --device cuda --out gpu_check.json        # under 8 minutes on one GPU
    python scripts/gpu_check.py --device cpu --tiny --backend aot_eager    # the test's run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dynpos import GPT, GPTConfig
from dynpos.model import compile_model
from dynpos.model.attention import causal_mask, eager_attention, flex_attention
from dynpos.model.fused import table_attention
from dynpos.positional import SCHEMES
from dynpos.positional.base import toeplitz

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
VOCAB = 50304  # GPT-2's vocabulary padded to a multiple of 64 (nanoGPT)


def attention_paths(device: torch.device) -> dict:
    """name -> (fn(q, k, v, table) -> out, trains): every path that runs on ``device``."""

    def masked(fn):
        return lambda q, k, v, t: fn(q, k, v, causal_mask(toeplitz(t, q.shape[-2]), q.shape[-2], q.shape[-2],
                                                          q.device, q.dtype))

    paths = {
        "eager": (masked(eager_attention), True),
        "sdpa": (masked(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m)), True),
    }
    if device.type == "cpu":
        paths["fused"] = (table_attention, True)
    paths["flex"] = (lambda q, k, v, t: flex_attention(q, k, v, t, None), device.type != "cpu")
    return paths


def check_paths(device: torch.device, n: int, heads: int, dim: int) -> list[dict]:
    """Every path against a float64 eager reference: output and the four gradients."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    leaves = [torch.randn(2, heads, n, dim, generator=gen) for _ in range(3)] + [torch.randn(heads, n, generator=gen)]
    grad_out = torch.randn(2, heads, n, dim, generator=gen)
    ref_in = [t.double().to(device).requires_grad_() for t in leaves]
    ref = eager_attention(*ref_in[:3], causal_mask(toeplitz(ref_in[3], n), n, n, device, torch.float64))
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double().to(device))
    for name, (fn, trains) in attention_paths(device).items():
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (t.to(device, dtype).requires_grad_(trains) for t in leaves[:3])
            table = leaves[3].to(device).requires_grad_(trains)  # the table stays float32, as the model's
            out = fn(q, k, v, table)
            errors = {"out": (out.double() - ref).abs().max().item() / max(1.0, ref.abs().max().item())}
            if trains:
                got = torch.autograd.grad(out, (q, k, v, table), grad_out.to(device, dtype))
                for label, a, b in zip(("dq", "dk", "dv", "dtable"), got, ref_grads):
                    errors[label] = (a.double() - b).abs().max().item() / max(1.0, b.abs().max().item())
            ok = all(e <= TOL[dtype] for e in errors.values())
            rows.append(dict(path=name, dtype=str(dtype).removeprefix("torch."), ok=ok, grads=trains,
                             errors={k: float(f"{e:.3g}") for k, e in errors.items()}))
            print(f"[paths] {name:<6} {rows[-1]['dtype']:<9} {'ok  ' if ok else 'FAIL'} "
                  f"{'' if trains else '(forward only: no backward on this device) '}{rows[-1]['errors']}", flush=True)
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(device, sizes: dict, scheme: str, attn: str, block: int, batch: int, compiled: bool,
              reps: int, backend: str) -> dict:
    """Median of ``reps`` training steps (after two warm-up steps, the first compiling)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=sizes.get("vocab", VOCAB), block_size=block, attn=attn,
                          **{k: v for k, v in sizes.items() if k != "vocab"}), pos=SCHEMES[scheme]).to(device)
    path = model.attention_choice(block, block, device).path
    if compiled:
        if backend == "inductor":
            compile_model(model)
        else:
            model.compile(backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randint(sizes.get("vocab", VOCAB), (batch, block), generator=gen).to(device) for _ in range(2))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        opt.step()

    start = time.perf_counter()
    step()
    _sync(device)
    first_s = time.perf_counter() - start
    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return dict(scheme=scheme, attn=attn, path=path, block=block, batch=batch, compiled=compiled,
                step_ms=med, tokens_per_s=batch * block / med * 1e3, peak_mb=peak, first_step_s=first_s)


def grid(args, device, sizes: dict, deadline: float) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    runs = [("nope", "auto"), ("dpb", "auto"), ("alibi", "auto"), ("rope", "auto")]
    if device.type == "cuda":
        runs.append(("dpb", "flex"))
    for block in args.blocks:
        for compiled in (False, True):
            for scheme, attn in runs:
                label = f"{scheme}/{attn} block {block} {'compiled' if compiled else 'eager'}"
                if time.perf_counter() > deadline:
                    skipped.append(label)
                    continue
                try:
                    row = time_step(device, sizes, scheme, attn, block, max(1, args.tokens // block), compiled,
                                    args.reps, args.backend)
                except torch.OutOfMemoryError:
                    skipped.append(label + " (out of memory)")
                    continue
                nope = next((r for r in rows if r["block"] == block and r["compiled"] == compiled
                             and r["scheme"] == "nope"), None)
                row["x_nope"] = row["step_ms"] / nope["step_ms"] if nope else 1.0
                rows.append(row)
                peak = f"{row['peak_mb']:.0f} MB" if row["peak_mb"] is not None else "-"
                print(f"[grid] {label:<34} ({row['path']}) {row['step_ms']:8.1f} ms {row['tokens_per_s']:9.0f} tok/s "
                      f"x nope {row['x_nope']:.2f} peak {peak} (first step {row['first_step_s']:.1f} s)", flush=True)
    return rows, skipped


def gpt2(args, device, deadline: float) -> tuple[dict, list[str]]:
    """GPT-2 small, compiled, DPB vs learned absolute positions."""
    sizes = dict(n_layer=12, n_head=12, n_embd=768) if not args.tiny else dict(n_layer=2, n_head=2, n_embd=32, vocab=65)
    block = 1024 if not args.tiny else 64
    rows, skipped = {}, []
    for scheme in ("learned", "dpb"):
        if time.perf_counter() > deadline:
            skipped.append(f"gpt2 {scheme}")
            continue
        rows[scheme] = time_step(device, sizes, scheme, "auto", block, args.gpt2_batch, True, args.reps, args.backend)
        r = rows[scheme]
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f} MB"
        print(f"[gpt2] {scheme:<8} ({r['path']}) {r['tokens_per_s']:.0f} tok/s, peak {peak}", flush=True)
    if len(rows) == 2:
        rows["dpb_over_learned_tokens"] = rows["dpb"]["tokens_per_s"] / rows["learned"]["tokens_per_s"]
        print(f"[gpt2] dpb / learned tokens/s: {rows['dpb_over_learned_tokens']:.2f} (target >= 0.9)")
    return rows, skipped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU test)")
    parser.add_argument("--blocks", type=int, nargs="+", default=None, help="grid blocks (default 1024 4096 8192)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per grid step (default 16384)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--gpt2-batch", type=int, default=None, help="GPT-2 small batch at block 1024 (default 8)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: quick CPU test)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting rows after this many seconds")
    parser.add_argument("--out", default=None, help="JSON file for all results")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    small = args.tiny
    args.blocks = args.blocks or ([32] if small else [1024, 4096, 8192])
    args.tokens = args.tokens or (128 if small else 16384)
    args.gpt2_batch = args.gpt2_batch or (2 if small else 8)
    grid_sizes = dict(n_layer=2, n_head=2, n_embd=32, vocab=65) if small else dict(n_layer=6, n_head=8, n_embd=512)
    start = time.perf_counter()
    deadline = start + args.budget_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}, command: {' '.join(sys.argv)}", flush=True)
    result: dict = dict(torch=torch.__version__, device=name, argv=sys.argv)
    result["paths"] = check_paths(device, n=40 if small else 1024, heads=2 if small else 8, dim=16 if small else 64)
    result["grid"], skipped = grid(args, device, grid_sizes, deadline)
    result["gpt2"], skipped2 = gpt2(args, device, deadline)
    result["skipped"] = skipped + skipped2
    result["elapsed_s"] = time.perf_counter() - start
    if result["skipped"]:
        print(f"skipped (budget {args.budget_s:.0f} s): {', '.join(result['skipped'])}")
    failed = [f"{r['path']}/{r['dtype']}" for r in result["paths"] if not r["ok"]]
    print(f"elapsed {result['elapsed_s']:.0f} s; path checks: {'all ok' if not failed else 'FAILED ' + ', '.join(failed)}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
