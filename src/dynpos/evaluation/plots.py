"""Pictures a person would rather look at than read: learned bias against distance, per head and
block, and loss or accuracy against evaluation length."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from dynpos.atomic import atomic_path  # noqa: E402
from dynpos.positional.base import PositionalScheme  # noqa: E402


@torch.no_grad()
def plot_bias(pos: PositionalScheme, n: int, title: str = "") -> Figure | None:
    """One panel per block (bias in logits against distance ``0 .. n-1``, a line per head) and a heatmap of
    head 0's ``(n, n)`` bias in block 0 (blank above the causal diagonal). The curves come from the scheme's
    per-distance tables or (FIRE) the last query row of its bias grids. None when the scheme adds no bias.
    """
    tables = pos.tables(n)
    if tables[0] is None:
        grids = pos.biases(n, n)
        if grids[0] is None:
            return None
        tables = [grid[:, -1, :].flip(-1) for grid in grids]
    curves = [table.float().cpu() for table in tables]
    shared = all(c is curves[0] or torch.equal(c, curves[0]) for c in curves)
    shown = curves[:1] if shared else curves
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(3.6 * (len(shown) + 1), 3.2), squeeze=False)
    *panels, heatmap = axes[0]
    for layer, (ax, curve) in enumerate(zip(panels, shown)):
        ax.plot(range(n), curve.T.numpy(), label=[f"head {h}" for h in range(len(curve))], linewidth=1)
        ax.set(title="all blocks (shared)" if shared else f"block {layer}", xlabel="relative distance",
               ylabel="bias (logits)")
    panels[0].legend(fontsize=6)
    grid = pos.bias(0, n, n)[0].float().cpu()
    grid = grid.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("nan"))
    image = heatmap.imshow(grid.numpy(), cmap="viridis")
    heatmap.set(title="block 0, head 0: bias[x, y]", xlabel="key position y", ylabel="query position x")
    fig.colorbar(image, ax=heatmap, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_lengths(curves: dict, train_length: int | None = None, metric: str = "loss", title: str = "") -> Figure:
    """``metric`` against evaluation length, a line per label: ``loss`` (nats/token) or ``bpb`` against
    tokens, ``exact_match`` or ``token_accuracy`` (in ``[0, 1]``) against task units.

    ``curves``: label -> rows (a list of dicts or a DataFrame) with ``length``, ``metric`` and, for
    error bars, ``<metric>_std``; rows without a value are left out. Labels ``"<scheme> (<variant>)"``
    share a colour per scheme and a line style per variant (protocol). ``train_length``: a dashed line.
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    schemes = list(dict.fromkeys(label.split(" (")[0] for label in curves))
    variants = list(dict.fromkeys(label.partition(" (")[2] for label in curves))
    colours = plt.get_cmap("tab10" if len(schemes) <= 10 else "tab20").colors
    for label, rows in curves.items():
        kept = pd.DataFrame(rows).reindex(columns=["length", metric, f"{metric}_std"]).dropna(subset=[metric])
        if not kept.empty:
            ax.errorbar(kept["length"].tolist(), kept[metric].tolist(), yerr=kept[f"{metric}_std"].fillna(0.0).tolist(),
                        marker="o", capsize=3, label=label, linewidth=1.2,
                        color=colours[schemes.index(label.split(" (")[0]) % len(colours)],
                        linestyle=("-", "--", ":", "-.")[variants.index(label.partition(" (")[2]) % 4])
    if train_length:
        ax.axvline(train_length, color="grey", linestyle="--", linewidth=1, label="training length")
    accuracy = metric in ("exact_match", "token_accuracy")
    ax.set_xscale("log", base=2)
    ylabel = {"loss": "loss (nats/token)", "bpb": "bits per byte", "exact_match": "exact-match accuracy",
              "token_accuracy": "per-token accuracy"}.get(metric, metric)
    ax.set(title=title, xlabel="length (task units)" if accuracy else "evaluation length (tokens)", ylabel=ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if accuracy:
        ax.set_ylim(-0.03, 1.03)
    return fig


def save_figure(fig: Figure, path) -> None:
    """Save a figure as PNG atomically (temporary file, then rename) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
