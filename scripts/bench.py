"""Benchmark dynpos models end to end on the CPU: training steps, nanoGPT's settings, long-context
evaluation memory and KV-cache generation.

Modes (any combination; the training grid runs unless ``--no-train``):

* training grid: one step = forward + backward + grad-norm clip (1.0, as nanoGPT and the trainer)
  + AdamW step of :class:`dynpos.GPT`, over (preset, block, scheme, attention path, precision).
  All configurations of one (preset, block) are built first and timed in interleaved rounds
  (``interleaved`` from ``bench_attention.py``; the first round warms up and is dropped), so load
  from other processes falls on every row alike. Reports the median step in ms, tokens/s and the
  ratio of the median to the floor: NoPE with bias-free causal SDPA at the same block. Reference
  rows: ``nope/sdpa`` (the floor), ``learned/sdpa`` (nanoGPT's design) and, when
  ``x_transformers`` imports (the optional ``bench`` extra), ``Decoder(dynamic_pos_bias=True)``
  with the same width, depth, heads, block and batch (``xt-dpb``).
  ``auto`` is shown with the path it resolves to (``GPT.attention_choice``, i.e.
  ``choose_attention``); a (scheme, path) that resolves to a row already in the grid is measured
  once. ``--compile`` adds, for each dynpos row but ``learned``, the model compiled
  (``compile_model``, label ``/compile``) and compiled with the AdamW step compiled too
  (``/compile+opt``); then three warm-up rounds are dropped. Training memory is not measured
  (see ``--eval-memory``).
* ``--nanogpt``: nanoGPT's CPU settings (batch 12, block 64, 4 layers, 4 heads, n_embd 128,
  dropout 0, no biases), fp32: ms per iteration of DPB on the auto path and of nanoGPT's own
  architecture built in dynpos (``learned/sdpa``), interleaved, and their ratio.
* ``--eval-memory``: peak memory of a no-grad forward (batch 1) at ``--eval-sizes`` on the preset
  (trained block 128), DPB vs NoPE on the auto path. Each (scheme, n) runs in a fresh subprocess
  that, after building the model and the input, resets the kernel's peak-RSS mark
  (``/proc/self/clear_refs``) and notes the current RSS, then reads the peak (``VmHWM``, the
  per-process ``ru_maxrss``) after the forward: the difference is the forward's peak resident
  memory above the baseline (allocator caching included). The child also reports the path
  attention took.
* ``--generate``: ``GPT.generate`` (KV cache) of ``--new-tokens`` tokens after a 64-token prompt,
  DPB, block 1024 so the cache is used throughout, against a loop that recomputes the whole
  context each step (same sampling); tokens/s and the ratio.

    python scripts/bench.py --presets micro --blocks 256 1024 --schemes dpb nope learned alibi \\
        --paths auto sdpa --precision 32 --extra dpb:auto:bf16:256 --batch 8 --reps 5 --threads 1 \\
        --nanogpt --eval-memory --generate --out bench.json

On a loaded 2-core machine use ``--threads 1``: two OpenMP threads competing with other processes
spin against each other and measure the contention, not the code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import interleaved  # noqa: E402

from dynpos import GPT, GPTConfig  # noqa: E402
from dynpos.atomic import write_json  # noqa: E402
from dynpos.model import compile_model  # noqa: E402
from dynpos.positional import SCHEMES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 65  # Shakespeare characters, the corpus the CPU presets train on


def preset(name: str) -> dict:
    """Sizes from ``configs/model/<name>.yaml`` (flat ``key: value`` lines)."""
    sizes = {}
    for line in (ROOT / "configs" / "model" / f"{name}.yaml").read_text().splitlines():
        line = line.split("#")[0].strip()
        if ":" in line:
            key, value = (s.strip() for s in line.split(":", 1))
            if key in ("n_layer", "n_head", "n_embd"):
                sizes[key] = int(value)
    return sizes


def load() -> float:
    return os.getloadavg()[0]


def build(scheme: str, path: str, block: int, sizes: dict, seed: int = 0):
    torch.manual_seed(seed)
    if scheme == "xt-dpb":
        from x_transformers import Decoder, TransformerWrapper

        model = TransformerWrapper(
            num_tokens=VOCAB, max_seq_len=block, use_abs_pos_emb=False,
            attn_layers=Decoder(dim=sizes["n_embd"], depth=sizes["n_layer"], heads=sizes["n_head"],
                                attn_dim_head=sizes["n_embd"] // sizes["n_head"], dynamic_pos_bias=True),
        )
        return model, "x-transformers"
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=block, attn=path, **sizes), pos=SCHEMES[scheme])
    resolved = model.attention_choice(block, block, "cpu").path  # training: grad on, train mode
    return model, resolved


def train_step(model, x, y, bf16: bool, xt: bool, compile_opt: bool = False):
    """Returns a closure running one optimizer step (``compile_opt``: the AdamW step compiled,
    as PyTorch's compiled-optimizer recipe does)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    opt_step = torch.compile(opt.step, fullgraph=False) if compile_opt else opt.step

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if xt:
                logits = model(x)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            else:
                _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt_step()

    return step


def training_grid(args, sizes: dict) -> list[dict]:
    rows = []
    specs = []  # (scheme, path, precision, block)
    for block in args.blocks:  # references first, so their labels win the de-duplication
        specs.append(("nope", "sdpa", "32", block))
        specs.append(("learned", "sdpa", "32", block))
        if args.xt:
            specs.append(("xt-dpb", "-", "32", block))
        for scheme in args.schemes:
            for path in args.paths:
                for prec in args.precision:
                    specs.append((scheme, path, prec, block))
    for extra in args.extra:
        scheme, path, prec, block = extra.split(":")
        specs.append((scheme, path, prec, int(block)))
    modes = ["eager"] + (["compile", "compile+opt"] if args.compile else [])
    for block in sorted({s[3] for s in specs}):
        runs, meta, seen = {}, {}, set()
        g = torch.Generator().manual_seed(1)
        x = torch.randint(VOCAB, (args.batch, block), generator=g)
        y = torch.randint(VOCAB, (args.batch, block), generator=g)
        for scheme, path, prec, b in specs:
            for mode in modes:
                if b != block or (mode != "eager" and scheme in ("xt-dpb", "learned")):
                    continue
                model, resolved = build(scheme, path, block, sizes)
                key = (scheme, resolved, prec, mode)
                if key in seen:
                    continue
                seen.add(key)
                label = (f"{scheme}/{path}" + (f"->{resolved}" if path == "auto" else "") + f"/{prec}"
                         + ("" if mode == "eager" else f"/{mode}"))
                if mode != "eager":
                    compile_model(model)
                runs[label] = train_step(model.train(), x, y, prec == "bf16", scheme == "xt-dpb",
                                         compile_opt=mode == "compile+opt")
                meta[label] = dict(scheme=scheme, path=path, resolved=resolved, precision=prec, block=block,
                                   batch=args.batch, params=sum(p.numel() for p in model.parameters()), mode=mode)
        start_load = load()
        warmup = 3 if args.compile else 1  # compiling: the first calls compile and recompile
        print(f"[train] block {block}: {len(runs)} configs x ({args.reps} reps + {warmup} warm-up), "
              f"load {start_load:.2f}", flush=True)
        times = interleaved(runs, args.reps, warmup=warmup)
        floor = statistics.median(times.get("nope/sdpa/32", [float("nan")]))
        for label, ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(meta[label], label=label, step_ms=med, min_ms=min(ts), times_ms=ts,
                             tokens_per_s=args.batch * block / med * 1e3, x_floor=med / floor,
                             load_start=start_load, load_end=load()))
    return rows


def print_training(rows: list[dict]) -> None:
    print(f"\n{'block':>5} {'config':<40} {'step ms':>9} {'min ms':>9} {'tok/s':>8} {'x nope-sdpa':>11}")
    for r in rows:
        print(f"{r['block']:>5} {r['label']:<40} {r['step_ms']:>9.1f} {r['min_ms']:>9.1f} "
              f"{r['tokens_per_s']:>8.0f} {r['x_floor']:>11.2f}")


def nanogpt(args) -> dict:
    """nanoGPT's CPU settings: DPB on the auto path against nanoGPT's own architecture
    (learned absolute positions, bias-free causal SDPA, no Linear/LayerNorm biases) built in
    dynpos, interleaved in one run."""
    sizes = dict(n_layer=4, n_head=4, n_embd=128, bias=False)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(VOCAB, (12, 64), generator=g) for _ in range(2))
    steps, resolved = {}, {}
    for scheme, path in (("dpb", "auto"), ("learned", "sdpa")):
        model, resolved[scheme] = build(scheme, path, 64, sizes)
        steps[scheme] = train_step(model.train(), x, y, False, False)
    start_load = load()
    times = interleaved(steps, args.nanogpt_iters, warmup=3)
    rows = {}
    for scheme, ts in times.items():
        med = statistics.median(ts)
        rows[scheme] = dict(resolved=resolved[scheme], ms_per_iter=med, min_ms=min(ts),
                            tokens_per_s=12 * 64 / med * 1e3)
    ratio = rows["dpb"]["ms_per_iter"] / rows["learned"]["ms_per_iter"]
    row = dict(batch=12, block=64, **rows, dpb_over_learned=ratio, load_start=start_load, load_end=load())
    print(f"\n[nanogpt] batch 12 block 64 4x4x128 bias=False, {args.nanogpt_iters} interleaved iters, "
          f"load {start_load:.2f} -> {row['load_end']:.2f}")
    for scheme, r in rows.items():
        print(f"  {scheme}/{r['resolved']}: {r['ms_per_iter']:.1f} ms/iter median (min {r['min_ms']:.1f}), "
              f"{r['tokens_per_s']:.0f} tok/s")
    print(f"  dpb / learned (nanoGPT's design): {ratio:.3f}")
    return row


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Reset the peak-RSS mark (Linux ``clear_refs`` 5) and return the current RSS in KiB.

    Without the reset, ``ru_maxrss`` keeps the peak of ``import torch`` and model building, which
    can exceed the forward's own peak and hide it. Falls back to ``ru_maxrss`` elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss(base: int) -> int:
    try:
        return _status_kb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def eval_child(scheme: str, n: int, preset_name: str) -> None:
    """Run in a fresh process: print JSON with the forward's max-RSS delta."""
    sizes = preset(preset_name)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=128, **sizes), pos=SCHEMES[scheme]).eval()
    x = torch.randint(VOCAB, (1, n))
    with torch.no_grad():
        path = model.attention_choice(n, n, "cpu").path
        base = _reset_peak_rss()
        start = time.perf_counter()
        model(x)
        elapsed = time.perf_counter() - start
    peak = _peak_rss(base)
    print(json.dumps(dict(scheme=scheme, n=n, path=path, base_mb=base / 1024, delta_mb=(peak - base) / 1024,
                          forward_s=elapsed)))


def eval_memory(args) -> list[dict]:
    rows = []
    for n in args.eval_sizes:
        pair = {}
        for scheme in ("dpb", "nope"):
            out = subprocess.run([sys.executable, __file__, "--eval-child", scheme, str(n), "--presets",
                                  args.presets[0], "--threads", str(torch.get_num_threads())], capture_output=True, text=True, check=True)
            pair[scheme] = json.loads(out.stdout.strip().splitlines()[-1])
        ratio = pair["dpb"]["delta_mb"] / pair["nope"]["delta_mb"] if pair["nope"]["delta_mb"] else float("nan")
        rows.append(dict(n=n, dpb=pair["dpb"], nope=pair["nope"], ratio=ratio))
        print(f"[eval-memory] n={n:>6}: dpb ({pair['dpb']['path']}) +{pair['dpb']['delta_mb']:.0f} MB "
              f"{pair['dpb']['forward_s']:.2f} s, nope ({pair['nope']['path']}) +{pair['nope']['delta_mb']:.0f} MB "
              f"{pair['nope']['forward_s']:.2f} s, ratio {ratio:.2f}", flush=True)
    return rows


def generate(args, sizes: dict) -> dict:
    prompt_len, new = 64, args.new_tokens
    model, _ = build("dpb", "auto", max(1024, prompt_len + new), sizes)
    model.eval()
    prompt = torch.randint(VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(2))

    def cached():
        model.generate(prompt, new, generator=torch.Generator().manual_seed(3))

    @torch.no_grad()
    def recompute():
        g = torch.Generator().manual_seed(3)
        idx = prompt
        for _ in range(new):
            logits, _ = model(idx)
            probs = torch.softmax(logits[:, -1, :].float(), dim=-1)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g)], dim=1)

    start_load = load()
    times = interleaved({"kv-cache": cached, "recompute": recompute}, args.gen_reps)
    med = {k: statistics.median(v) for k, v in times.items()}
    row = dict(new_tokens=new, prompt=prompt_len, cache_ms=med["kv-cache"], recompute_ms=med["recompute"],
               cache_tok_s=new / med["kv-cache"] * 1e3, recompute_tok_s=new / med["recompute"] * 1e3,
               speedup=med["recompute"] / med["kv-cache"], load_start=start_load, load_end=load())
    print(f"\n[generate] {new} tokens after {prompt_len}: kv-cache {row['cache_tok_s']:.0f} tok/s, recompute "
          f"{row['recompute_tok_s']:.0f} tok/s, speedup {row['speedup']:.1f}x, load {start_load:.2f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["micro"], help="configs/model/<name>.yaml")
    parser.add_argument("--blocks", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--schemes", nargs="+", default=["dpb", "nope", "learned", "alibi"])
    parser.add_argument("--paths", nargs="+", default=["auto", "sdpa"])
    parser.add_argument("--precision", nargs="+", default=["32"], choices=["32", "bf16"])
    parser.add_argument("--extra", nargs="*", default=[], help="extra rows scheme:path:precision:block")
    parser.add_argument("--compile", action="store_true",
                        help="also time each dynpos row compiled (compile_model) and compiled with the AdamW step compiled")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-train", action="store_true", help="skip the training grid")
    parser.add_argument("--no-xt", action="store_true", help="skip the x-transformers row")
    parser.add_argument("--nanogpt", action="store_true")
    parser.add_argument("--nanogpt-iters", type=int, default=30)
    parser.add_argument("--eval-memory", action="store_true")
    parser.add_argument("--eval-sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--generate", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--gen-reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default torch's); 1 avoids OpenMP spin contention on a loaded machine")
    parser.add_argument("--out", default=None, help="JSON file for all results")
    parser.add_argument("--eval-child", nargs=2, metavar=("SCHEME", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eval_child:
        eval_child(args.eval_child[0], int(args.eval_child[1]), args.presets[0])
        return
    args.xt = False
    if not args.no_xt:
        try:
            import x_transformers  # noqa: F401
            args.xt = True
        except ImportError:
            print("x_transformers not installed: no xt-dpb reference row (pip install x-transformers)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}, "
          f"command: {' '.join(sys.argv)}", flush=True)
    result: dict = dict(torch=torch.__version__, threads=torch.get_num_threads(), argv=sys.argv,
                        load_start=os.getloadavg())
    if not args.no_train:
        result["train"] = []
        for name in args.presets:
            rows = training_grid(args, preset(name))
            for r in rows:
                r["preset"] = name
            result["train"] += rows
        print_training(result["train"])
    if args.nanogpt:
        result["nanogpt"] = nanogpt(args)
    if args.eval_memory:
        result["eval_memory"] = eval_memory(args)
    if args.generate:
        result["generate"] = generate(args, preset(args.presets[0]))
    result["load_end"] = os.getloadavg()
    print(f"\nload average at the end {result['load_end']}")
    if args.out:
        write_json(args.out, result)  # atomically, creating its folder
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
