"""Train short, test long: loss and bits per byte against evaluation length.

Two protocols, as the ALiBi paper discusses (Press et al. 2022, "Train Short, Test Long", §4 and
appendix B):

* ``nonoverlap``: the text is cut into disjoint windows of ``length`` tokens and every token is
  scored. Early tokens of each window see little context, so this understates long-context gains.
* ``sliding``: windows of ``length`` tokens advance by ``stride``; only the last ``stride`` tokens
  of each window are scored (all of the first window's), so nearly every token sees close to
  ``length - stride`` tokens of context.

Every length scores the same span of text (the first ``max_tokens + 1`` tokens of the split), so
rows are comparable. A scheme that cannot encode a length (learned absolute positions beyond
``block_size``) gets a row with ``loss = None`` and the reason: an explicit choice, never an index
error from inside torch.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dynpos.atomic import atomic_path
from dynpos.evaluation.plots import plot_lengths, save_figure
from dynpos.model.gpt import GPT

PROTOCOLS = ("nonoverlap", "sliding")


def window_plan(n_tokens: int, length: int, protocol: str, stride: int | None = None) -> list[tuple[int, int]]:
    """Windows over a text of ``n_tokens`` targets: ``(start, scored)`` pairs.

    Window ``start .. start + length`` of inputs predicts targets ``start + 1 .. start + length``;
    its last ``scored`` targets count. Every target ``1 .. n`` is scored exactly once, where
    ``n = n_tokens`` rounded down to whole windows (nonoverlap) or to ``length`` plus whole
    strides (sliding); ``stride`` defaults to ``length // 2`` and only applies to ``sliding``.

    Raises:
        ValueError: for ``length < 1``, an unknown protocol, or a stride outside ``1 .. length``.
    """
    if length < 1:
        raise ValueError(f"eval.lengths must be positive, got {length}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if protocol == "nonoverlap":
        return [(s, length) for s in range(0, n_tokens - length + 1, length)]
    stride = max(1, length // 2) if stride is None else stride
    if not 1 <= stride <= length:
        raise ValueError(f"eval.stride={stride} must be in 1..{length} (the evaluation length)")
    if n_tokens < length:
        return []
    plan = [(0, length)]
    start = stride
    while start + length <= n_tokens:
        plan.append((start, stride))
        start += stride
    return plan


@torch.no_grad()
def windowed_loss(model: GPT, tokens: Tensor, plan: list[tuple[int, int]], length: int, batch_size: int) -> float:
    """Mean cross-entropy (nats/token) of the scored targets of ``plan`` over ``tokens (n,)``."""
    total, count = 0.0, 0
    for b in range(0, len(plan), batch_size):
        chunk = plan[b : b + batch_size]
        x = torch.stack([tokens[s : s + length] for s, _ in chunk]).long()
        y = torch.stack([tokens[s + 1 : s + length + 1] for s, _ in chunk]).long()
        for row, (_, scored) in enumerate(chunk):
            y[row, : length - scored] = -1  # not scored: ignore_index
        logits, _ = model(x)
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum"
        )
        total += losses.item()
        count += int((y >= 0).sum())
    return total / max(count, 1)


def evaluate_lengths(model: GPT, tokens: np.ndarray | Tensor, lengths: list[int], *, protocol: str = "nonoverlap",
                     stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
                     bytes_per_token: float | None = None) -> list[dict]:
    """Loss (nats/token), perplexity and bits per byte at each evaluation length.

    Args:
        model: the trained GPT (put in eval mode here).
        tokens: the split's token ids ``(n,)``.
        lengths: evaluation lengths in tokens.
        protocol: ``nonoverlap`` or ``sliding``; stride: the sliding step (default ``length // 2``).
        max_tokens: targets scored per length (the same span of text for every length); None = the
            whole split, so at the training length the score equals training's validation with
            ``data.val_windows=null``.
        bytes_per_token: UTF-8 bytes per token of the split, for bits per byte.

    Returns:
        One dict per length: ``length``, ``protocol``, ``stride`` (the sliding step used; None for
        ``nonoverlap``), ``loss``, ``ppl``, ``bpb``, ``tokens`` (targets scored) and ``note`` (why a
        length was skipped).

    Raises:
        ValueError: for a length < 1, an unknown protocol or bad stride, or a text shorter than
            the longest length.
    """
    model.eval()
    tokens = torch.as_tensor(np.asarray(tokens if max_tokens is None else tokens[: max_tokens + 1]).astype(np.int64))
    n_targets = len(tokens) - 1
    limit = model.pos.max_length
    rows = []
    for length in lengths:
        plan = window_plan(n_targets, int(length), protocol, stride)
        used = (max(1, int(length) // 2) if stride is None else stride) if protocol == "sliding" else None
        row = {"length": int(length), "protocol": protocol, "stride": used,
               "loss": None, "ppl": None, "bpb": None, "tokens": 0, "note": ""}
        if not plan:
            raise ValueError(
                f"eval.lengths: {length} tokens exceed the {n_targets} evaluated targets: "
                "raise eval.max_tokens or use a split with more text"
            )
        if limit is not None and length > limit:
            row["note"] = f"pos={model.pos.name} encodes at most {limit} positions"
            rows.append(row)
            continue
        loss = windowed_loss(model, tokens, plan, int(length), batch_size)
        row.update(loss=loss, ppl=math.exp(loss), tokens=sum(s for _, s in plan))
        if bytes_per_token:
            row["bpb"] = loss / math.log(2) / bytes_per_token
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    """Write the evaluation rows as CSV, atomically (temporary file, then rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_extrapolation(model: GPT, tokens: np.ndarray, bytes_per_token: float | None, out_dir: Path, *,
                      lengths: list[int], protocol: str = "nonoverlap", stride: int | None = None,
                      max_tokens: int | None = None, batch_size: int = 8, **_: object) -> list[dict]:
    """Evaluate at each length with one protocol or ``both``; write ``extrapolation.csv`` and
    ``extrapolation.png`` (loss against length) into ``out_dir``; return the rows.

    Keyword arguments are the ``eval`` config keys (``split`` is chosen by the caller).
    """
    protocols = PROTOCOLS if protocol == "both" else (protocol,)
    rows: list[dict] = []
    curves = {}
    for name in protocols:
        curve = evaluate_lengths(model, tokens, list(lengths), protocol=name, stride=stride,
                                 max_tokens=max_tokens, batch_size=batch_size, bytes_per_token=bytes_per_token)
        curves[name] = curve
        rows.extend(curve)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "extrapolation.csv")
    title = f"pos={model.pos.name}: loss against evaluation length"
    save_figure(plot_lengths(curves, model.config.block_size, title=title), out_dir / "extrapolation.png")
    return rows
