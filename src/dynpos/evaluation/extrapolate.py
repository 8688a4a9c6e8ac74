"""Train short, test long: loss and bits per byte against evaluation length.

Two protocols, as the ALiBi paper discusses (Press et al. 2022, "Train Short, Test Long", §4 and
appendix B): ``nonoverlap`` cuts the text into disjoint windows of ``length`` tokens and scores
every token (early tokens of a window see little context, understating long-context gains);
``sliding`` advances windows of ``length`` tokens by ``stride`` and scores only the last ``stride``
tokens of each (all of the first window's), so nearly every token sees ``length - stride`` tokens
of context. Every length scores the same span of text, so rows are comparable; a length the scheme
cannot encode (learned positions past ``block_size``) gets a row with ``loss = None`` and the reason.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from dynpos.atomic import atomic_path
from dynpos.evaluation.plots import plot_lengths, save_figure
from dynpos.model.gpt import GPT

PROTOCOLS = ("nonoverlap", "sliding")


def window_plan(n_tokens: int, length: int, protocol: str, stride: int | None = None) -> list[tuple[int, int]]:
    """Windows over a text of ``n_tokens`` targets: ``(start, scored)``, the window of inputs
    ``start .. start + length`` scoring its last ``scored`` targets: all of the first window's, then
    ``stride`` per window (nonoverlap: ``stride = length``; sliding: default ``length // 2``). Every
    target ``1 .. n`` is scored once, ``n`` being ``n_tokens`` rounded down to ``length`` plus whole
    strides. Raises ValueError for ``length < 1``, an unknown protocol, or a stride outside ``1 .. length``.
    """
    if length < 1:
        raise ValueError(f"eval.lengths must be positive, got {length}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if protocol == "nonoverlap":
        stride = length
    elif stride is None:
        stride = max(1, length // 2)
    if not 1 <= stride <= length:
        raise ValueError(f"eval.stride={stride} must be in 1..{length} (the evaluation length)")
    return [(start, stride if start else length) for start in range(0, n_tokens - length + 1, stride)]


def encodable(model: nn.Module, n_tokens: int) -> bool:
    """Whether ``model.pos`` can encode ``n_tokens`` positions (its ``max_length`` None or larger)."""
    return model.pos.max_length is None or n_tokens <= model.pos.max_length


@torch.no_grad()
def windowed_loss(model: GPT, tokens: Tensor, plan: list[tuple[int, int]], length: int, batch_size: int) -> float:
    """Mean cross-entropy (nats/token) of the scored targets of ``plan`` over ``tokens (n,)``."""
    total = 0.0
    for b in range(0, len(plan), batch_size):
        starts, counts = zip(*plan[b : b + batch_size])
        windows = torch.stack([tokens[s : s + length + 1] for s in starts]).long()
        unscored = torch.arange(length) < length - torch.tensor(counts)[:, None]  # targets before the scored ones
        x, y = windows[:, :-1], windows[:, 1:].masked_fill(unscored.to(windows.device), -1)  # -1: ignore_index
        logits, _ = model(x)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1,
                                                   reduction="sum").item()
    return total / max(sum(scored for _, scored in plan), 1)


def evaluate_lengths(model: GPT, tokens: np.ndarray | Tensor, lengths: list[int], *, protocol: str = "nonoverlap",
                     stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
                     bytes_per_token: float | None = None) -> list[dict]:
    """Loss (nats/token), perplexity and bits per byte of ``model`` (put in eval mode) on the token
    ids ``tokens (n,)`` at each of ``lengths`` (tokens), by ``protocol`` (see :func:`window_plan`).

    ``max_tokens`` targets are scored per length, the same span of text for every length (None: the
    whole split, so at the training length the score equals training's validation with
    ``data.val_windows=null``); ``bytes_per_token`` (UTF-8 bytes per token) gives bits per byte.
    Returns one dict per length: ``length``, ``protocol``, ``stride`` (the sliding step used; None
    for ``nonoverlap``), ``loss``, ``ppl``, ``bpb``, ``tokens`` (targets scored), ``note`` (why a
    length was skipped). Raises ValueError for a length < 1, an unknown protocol or bad stride, or a
    text shorter than the longest length.
    """
    model.eval()
    tokens = torch.as_tensor(np.asarray(tokens if max_tokens is None else tokens[: max_tokens + 1]).astype(np.int64))
    rows = []
    for length in map(int, lengths):
        plan = window_plan(len(tokens) - 1, length, protocol, stride)
        if not plan:
            raise ValueError(f"eval.lengths: {length} tokens exceed the {len(tokens) - 1} evaluated targets: "
                             "raise eval.max_tokens or use a split with more text")
        used = (max(1, length // 2) if stride is None else stride) if protocol == "sliding" else None
        row = {"length": length, "protocol": protocol, "stride": used, "loss": None, "ppl": None, "bpb": None,
               "tokens": 0, "note": ""}
        if not encodable(model, length):
            rows.append({**row, "note": f"pos={model.pos.name} encodes at most {model.pos.max_length} positions"})
            continue
        loss = windowed_loss(model, tokens, plan, length, batch_size)
        rows.append({**row, "loss": loss, "ppl": math.exp(loss), "tokens": sum(s for _, s in plan),
                     "bpb": loss / math.log(2) / bytes_per_token if bytes_per_token else None})
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    """Write rows (dicts with the same keys) as CSV, atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_extrapolation(model: GPT, tokens: np.ndarray, bytes_per_token: float | None, out_dir: Path, *,
                      lengths: list[int], protocol: str = "nonoverlap", stride: int | None = None,
                      max_tokens: int | None = None, batch_size: int = 8, **_: object) -> list[dict]:
    """:func:`evaluate_lengths` with one protocol or ``both``, written as ``extrapolation.csv`` and
    ``extrapolation.png`` (loss against length) into ``out_dir``; keyword arguments are the ``eval``
    config keys (the caller applies ``split``). Returns the rows."""
    curves = {name: evaluate_lengths(model, tokens, list(lengths), protocol=name, stride=stride, max_tokens=max_tokens,
                                     batch_size=batch_size, bytes_per_token=bytes_per_token)
              for name in (PROTOCOLS if protocol == "both" else (protocol,))}
    rows = [row for curve in curves.values() for row in curve]
    write_csv(rows, out_dir / "extrapolation.csv")
    title = f"pos={model.pos.name}: loss against evaluation length"
    save_figure(plot_lengths(curves, model.config.block_size, title=title), out_dir / "extrapolation.png")
    return rows
