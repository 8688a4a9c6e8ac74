"""Sweep reports (pandas): mean ± std over seeds per scheme, a plot, which differences are within
seed noise (:data:`NOISE_RULE`, a lenient screen rather than a significance test: README, "Ablating
positional schemes") against a baseline, from the training length to longer ones (paired by seed:
``se = sd(d_seed) / sqrt(n)``) and between every pair of schemes, and for task sweeps accuracy
against length with ranks and mean reciprocal rank (Kazemnejad et al. 2023).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from dynpos.atomic import write_text
from dynpos.evaluation.lengthgen import METRICS
from dynpos.evaluation.plots import plot_lengths, plt, save_figure

# Config keys that differ between the runs of any sweep without changing what is compared (eval.protocol:
# every score carries its protocol, so runs scored with other protocols fill other columns).
BOOKKEEPING = ("seed", "run_name", "group", "paths.", "ckpt_path", "callbacks.", "logger.", "eval.protocol")
NOISE_RULE = "|mean difference| < 2 × Welch standard error sqrt(s₁²/n₁ + s₂²/n₂) over seeds"
KEYS = ["run", "metric", "split", "protocol", "length"]  # a run has one value per KEYS
T975 = (12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23)  # Student t, 97.5%, 1..10 d.o.f.


def _job_order(path: Path) -> tuple:
    head = path.parent.name.split("_", 1)[0]
    return (str(path.parent.parent), int(head) if head.isdigit() else math.inf, str(path))


def load_sweep(sweep_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read every ``result.json`` below ``sweep_dir`` (one per run folder ``<num>_<run>_seed<seed>/``
    of ``python train.py -m``), in job order, into ``(runs, long)``.

    ``runs``: a row per run: ``path``, ``label`` (the overrides that vary across runs, seed excluded:
    ``dpb, pos.depth=3``), ``seed``, ``pos``, ``num_params``, ``block_size`` (tokens), ``config`` and
    ``disagree`` (how many of its scores its evaluation files give differently).

    ``long``: a row per ``KEYS`` with ``label``, ``value`` (nats/token or bits per byte, NaN where
    not scored), ``note`` (why), ``variant`` and ``column`` (the report's header: ``test loss``,
    ``loss @256``, plus protocol and split where the sweep has several). Lengths come from
    ``result.json``, then from every ``extrapolation.csv`` of ``scripts/evaluate.py`` in the run folder
    (its split from the ``extrapolation.json`` beside it); of repeated rows the first with a value is kept.

    Raises NotADirectoryError when ``sweep_dir`` is a file, FileNotFoundError when it does not exist,
    ValueError when it holds no ``result.json``, or one that is not valid JSON or lacks ``metrics``.
    """
    root, where = Path(sweep_dir), "pass the folder that `python train.py -m ...` wrote (multirun/<date>_<time>)"
    if root.is_file():
        raise NotADirectoryError(f"sweep={root} is a file, not a folder: {where}")
    if not root.is_dir():
        raise FileNotFoundError(f"sweep folder {root} does not exist: {where}")
    paths = sorted(root.rglob("result.json"), key=_job_order)
    if not paths:
        raise ValueError(f"{root} holds no result.json: expected the run folders of a sweep, <sweep dir>/<num>_"
                         "<run>_seed<seed>/result.json as `python train.py -m ...` writes them (a run writes its "
                         "result.json when it finishes)")
    runs, rows = [], []
    for i, path in enumerate(paths):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}): delete it or rerun that job") from None
        if not isinstance(result, dict) or "metrics" not in result:
            raise ValueError(f"{path} has no 'metrics': not a dynpos result.json (written by train.py)")
        config, overrides = result.get("config") or {}, path.parent / ".hydra" / "overrides.yaml"
        runs.append({"path": path.parent, "seed": config.get("seed"), "num_params": result.get("num_params"),
                     "pos": str(result.get("pos") or (config.get("pos") or {}).get("_target_", "?")),
                     "block_size": (config.get("model") or {}).get("block_size"), "config": config,
                     "overrides": yaml.safe_load(overrides.read_text(encoding="utf-8")) if overrides.is_file() else []})
        rows += [{"run": i, "metric": k, "split": "", "protocol": "", "length": np.nan, "value": v, "note": ""}
                 for k, v in result["metrics"].items() if isinstance(v, (int, float))]
        split = (config.get("eval") or {}).get("split", "validation")
        tables = [pd.DataFrame(result.get("extrapolation") or []).assign(split=split)]
        for csv in sorted(path.parent.rglob("extrapolation.csv")):
            sidecar = csv.with_name("extrapolation.json")
            side = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
            tables.append(pd.read_csv(csv).assign(split=str(side.get("split", split))))
        ids = ["length", "protocol", "split", "note"]  # what a score is of; melted: metric (loss, bpb) and value
        for table in tables:
            table = table.reindex(columns=[*ids, "loss", "bpb"])
            rows += table.melt(ids, ["loss", "bpb"], "metric").assign(run=i).to_dict("records")
    runs = pd.DataFrame(runs)
    runs["label"] = _labels(runs)
    long = pd.DataFrame(rows, columns=[*KEYS, "value", "note"]).fillna({"note": ""})
    long["value"] = pd.to_numeric(long["value"]).where(lambda v: np.isfinite(v))
    spread = long[long.duplicated(KEYS, keep=False)].groupby(KEYS)["value"].agg(lambda v: v.max() - v.min())
    runs["disagree"] = (spread > 1e-6).groupby(level="run").sum().reindex(runs.index, fill_value=0)
    scored_first = long["value"].isna().sort_values(kind="stable").index  # a value beats a blank
    long = long.loc[scored_first].drop_duplicates(KEYS).sort_index().reset_index(drop=True)
    long["label"] = runs["label"].to_numpy()[long["run"]]
    at = long["length"].notna()
    several = [k for k in ("protocol", "split") if long.loc[at, k].nunique() > 1]
    long["variant"] = long[several].agg(" ".join, axis=1).where(at, "") if several else ""
    lengths = long["length"].astype("Int64").astype(str)
    long["column"] = (long["metric"] + " @" + lengths + (" " + long["variant"]).str.rstrip()).where(
        at, long["metric"].str.replace("/", " "))
    return runs, long


def _labels(runs: pd.DataFrame) -> list[str]:
    keyed = [dict((k.lstrip("+~"), v) for k, _, v in (str(o).partition("=") for o in overrides))
             for overrides in runs["overrides"].map(lambda o: o or [])]
    varying = [k for k in sorted({k for d in keyed for k in d}) if not k.startswith(BOOKKEEPING)
               and len({d.get(k) for d in keyed}) > 1]
    labels = []
    for pos, d in zip(runs["pos"], keyed):
        parts = [d.get("pos", pos) if k == "pos" else f"{k}={d.get(k, '(default)')}" for k in varying]
        labels.append(", ".join(parts if "pos" in varying or not parts else [pos, *parts]) or pos)
    return labels


def _lengths(long: pd.DataFrame) -> pd.DataFrame:
    return long[(long["metric"] == "loss") & long["length"].notna()]


def _agg(frame: pd.DataFrame, by: list[str], value: str = "value") -> pd.DataFrame:
    return frame.groupby(by, sort=False)[value].agg(mean="mean", std="std", n="count")


def summarize(long: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds, indexed by ``(label, column)`` (labels in job order; the report's columns:
    test loss and bpb, then the loss at each length by protocol, split and length), with ``mean``,
    ``std``, ``n`` and ``note`` (why a value is missing)."""
    cols = ["test loss", "test bpb", *dict.fromkeys(_lengths(long).sort_values(["variant", "length"])["column"])]
    index = pd.MultiIndex.from_product([list(dict.fromkeys(long["label"])), cols], names=["label", "column"])
    stats = _agg(long, ["label", "column"]).reindex(index).fillna({"n": 0})
    notes = long[long["note"] != ""].groupby(["label", "column"])["note"].first()
    return stats.assign(note=notes.reindex(stats.index).fillna(""))


def _verdict(diff: pd.Series, se: pd.Series) -> pd.DataFrame:
    """``diff``, ``se``, ``t = diff / se`` and ``noise``: True within seed noise (``|diff| < 2·se``),
    False beyond, None undecidable (a side with fewer than two seeds or no value)."""
    zero = (se == 0) & (diff == 0)
    noise = ((diff.abs() < 2 * se) | zero).astype(object).where(diff.notna() & se.notna(), None)
    return pd.DataFrame({"diff": diff, "se": se, "t": (diff / se).mask(zero, 0.0), "noise": noise})


def compare(stats: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Each label minus ``baseline`` on every column of :func:`summarize`'s frame, indexed by
    ``(label, column)``: :func:`_verdict` with the Welch standard error (rule: :data:`NOISE_RULE`).
    Raises ValueError when ``baseline`` is not one of the labels (the message lists them).
    """
    labels = list(stats.index.unique("label"))
    if baseline not in labels:
        raise ValueError(f"baseline={baseline!r} is not a scheme of this sweep: choose one of {', '.join(labels)}")
    both = stats.drop(index=baseline, level="label").join(stats.xs(baseline, level="label"), on="column", rsuffix="_b")
    se = np.sqrt(both["std"] ** 2 / both["n"] + both["std_b"] ** 2 / both["n_b"])
    return _verdict(both["mean"] - both["mean_b"], se)


def pairs(stats: pd.DataFrame) -> pd.DataFrame:
    """Every pair of labels on every column, indexed by ``(label, column)`` with ``label_b`` the
    earlier label in job order: :func:`compare`'s verdict of ``label - label_b``."""
    labels = list(stats.index.unique("label"))
    return pd.concat([compare(stats, b).loc[labels[i + 1:]].assign(label_b=b) for i, b in enumerate(labels[:-1])])


def length_changes(runs: pd.DataFrame, long: pd.DataFrame) -> pd.DataFrame:
    """How each label's loss moves from ``ref`` to each longer evaluation length, paired by seed: per
    run ``d = loss@N - loss@ref``, then :func:`_verdict` of the mean of ``d`` with ``se = sd(d) / sqrt(n)``.
    ``ref`` (tokens) is the training length (``block_size``, when the runs share one and it was scored),
    else the shortest length, per protocol and split. Indexed by ``(label, column)``, the longer
    columns; with a ``ref`` column; empty when the sweep scored no lengths."""
    block, out = runs["block_size"].unique(), []
    for _, curve in _lengths(long).groupby("variant", sort=False):
        lengths = sorted(curve["length"].unique())
        ref = next((n for n in lengths if len(block) == 1 and n == block[0]), lengths[0])
        wide = curve.pivot(index="run", columns="length", values="value")
        names = dict(zip(curve["length"], curve["column"]))
        diffs = wide[[n for n in lengths if n > ref]].sub(wide[ref], axis=0).rename(columns=names)
        diffs = diffs.reset_index().melt("run", var_name="column", value_name="d")
        stats = _agg(diffs.assign(label=runs["label"].to_numpy()[diffs["run"]]), ["label", "column"], "d")
        out.append(_verdict(stats["mean"], stats["std"] / np.sqrt(stats["n"])).assign(ref=int(ref)))
    return pd.concat(out) if out else pd.DataFrame(columns=["diff", "se", "t", "noise", "ref"])


def consistency_notes(runs: pd.DataFrame) -> list[str]:
    """What a fair comparison should hold fixed but the runs do not: config keys (other than the
    scheme's own ``pos.*``, the seed, bookkeeping and paths into each run's own folder) that
    differ, repeated (label, seed) pairs, and evaluation files that disagree."""
    flat = pd.json_normalize(list(runs["config"]))
    own = {k for k in flat if all(isinstance(v, str) and p.name in v for v, p in zip(flat[k], runs["path"]))}
    differ = [k for k in sorted(flat) if k not in own and not k.startswith(("pos.", *BOOKKEEPING))
              and flat[k].map(lambda v: json.dumps(v, sort_keys=True, default=str)).nunique() > 1]
    shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
    notes = [f"the runs differ in {shown}: not a like-for-like comparison"] if differ else []
    repeats = runs.groupby(["label", "seed"], sort=False, dropna=False).size()
    notes += [f"{n} runs of {label} with seed {seed}: all are counted" for (label, seed), n in repeats.items() if n > 1]
    for path, n in runs.loc[runs["disagree"] > 0, ["path", "disagree"]].to_numpy():
        notes.append(f"{path.name}: its evaluation files disagree on {n} score{'s' if n > 1 else ''} (another "
                     "checkpoint or settings?): the report uses result.json's, then the first extrapolation.csv's")
    return notes


def markdown_table(frame: pd.DataFrame) -> list[str]:
    """``frame`` as markdown lines, its index levels left-aligned, its columns right-aligned. Not
    ``DataFrame.to_markdown``, which needs the optional ``tabulate`` package and pads cells."""
    flat = frame.reset_index().astype(str)
    align = "|".join(["---"] * frame.index.nlevels + ["--:"] * len(frame.columns))
    return [f"| {' | '.join(flat.columns)} |", f"|{align}|", *(f"| {' | '.join(row)} |" for row in flat.to_numpy())]


def _grid(cells: pd.Series, labels: list[str], cols: list[str]) -> pd.DataFrame:
    """A ``(label, column)``-indexed Series of strings as a labels × columns table, ``n/a`` where missing."""
    return cells.unstack("column").reindex(index=labels, columns=cols).fillna("n/a").rename_axis("scheme")


def _cell(row: pd.Series) -> str:
    if pd.isna(row["diff"]):
        return "n/a"
    if row["noise"] is None:
        return f"{row['diff']:+.4f} (1 seed)"
    return f"{row['diff']:+.4f} ≈" if row["noise"] else f"**{row['diff']:+.4f}** (t={row['t']:+.1f})"


def _seeds(counts: pd.Series) -> str:
    """Runs per label in words: ``3 seeds``, ``2–3 seeds``, ``1 seed``."""
    lo, hi = counts.min(), counts.max()
    return f"{lo}{'' if lo == hi else f'–{hi}'} seed{'s' if hi > 1 else ''}"


def noise_text(runs: pd.DataFrame) -> str:
    """The report's paragraph on seed noise, with the t thresholds of the sweep's own seed counts:
    a Welch test's degrees of freedom lie between ``min(n) - 1`` and ``n_a + n_b - 2``."""
    counts = runs.groupby("label", sort=False).size()
    text = (f"Seed noise: a difference is within seed noise when {NOISE_RULE}. `≈` marks those, **bold** "
            "the differences beyond it, with t = difference / standard error.")
    if counts.max() < 2:
        return text + (" Every scheme ran 1 seed: no standard deviations, so no error bars and no noise "
                       "verdicts; run more seeds (e.g. seed=0,1,2) to tell a difference from noise.")
    several, single = counts[counts > 1], list(counts[counts < 2].index)
    t = [T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df for df in (several.min() - 1, 2 * several.max() - 2)]
    text += (f" With {_seeds(several)} a side a Welch t-test at 5% would need |t| of about {t[1]:.1f}–{t[0]:.1f}, "
             f"so treat |t| between 2 and {t[0]:.1f} as suggestive.")
    if single:
        text += (f" {', '.join(single)} ran 1 seed: no error bars and no noise verdict for "
                 f"{'it' if len(single) == 1 else 'them'}.")
    return text


def render_markdown(sweep_dir: Path, runs: pd.DataFrame, long: pd.DataFrame, baseline: str) -> str:
    """The report as markdown, up to its plot: the mean ± std table; the differences from ``baseline``,
    how each scheme's loss changes with evaluation length, and which pairs of schemes are within seed
    noise; any consistency notes. Raises :func:`compare`'s ValueError for a ``baseline`` that is not a label.
    """
    stats, labels = summarize(long), list(dict.fromkeys(runs["label"]))
    cols = list(stats.index.unique("column"))
    comparisons = compare(stats, baseline)
    compared = [c for c in cols if c != "test bpb"]  # bpb = loss / ln 2 / bytes per token: the same verdict
    block = sorted({int(b) for b in runs["block_size"].dropna()})
    lines = [f"# Sweep report: {sweep_dir}", "",
             f"{len(runs)} runs, {len(labels)} schemes, trained at {', '.join(map(str, block)) or '?'} tokens. "
             "Mean ± standard deviation over seeds; losses in nats/token on the held-out splits (test: the test "
             "split's fixed windows at the training length; loss @N: the validation split scored in windows of "
             "N tokens).", ""]
    cells = stats["mean"].map("{:.4f}".format) + stats["std"].map(" ± {:.4f}".format).where(stats["std"].notna(), "")
    table = _grid(cells.where(stats["mean"].notna(), "n/a"), labels, cols)
    by_label = runs.groupby("label", sort=False)
    table.insert(0, "params", by_label["num_params"].agg(lambda v: "–".join(dict.fromkeys(
        f"{int(n):,}" for n in (v.min(), v.max()))) if v.notna().any() else "?"))
    table.insert(0, "seeds", by_label.size().astype(str))
    lines += markdown_table(table)
    notes = sorted(set(stats.loc[stats["mean"].isna() & (stats["note"] != ""), "note"]))
    lines += [""] + [f"n/a: {note}." for note in notes] if notes else []
    lines += ["", noise_text(runs)]

    others = [label for label in labels if label != baseline]
    if others:
        lines += ["", f"## Differences from {baseline}", "",
                  f"Scheme minus {baseline} (negative: lower loss than {baseline}).", ""]
        lines += markdown_table(_grid(comparisons.apply(_cell, axis=1), others, compared)) + [""]
        for label in others:
            mine = comparisons.loc[label].reindex(compared)
            known, beyond = int(mine["noise"].notna().sum()), mine["noise"].eq(False)
            verdicts = {"within noise of": mine["noise"].eq(True), "lower loss than": beyond & (mine["diff"] < 0),
                        "higher loss than": beyond & (mine["diff"] > 0)}
            parts = [f"{what} {baseline}: " + ("everywhere" if mask.sum() == known > 1 else ", ".join(mine.index[mask]))
                     for what, mask in verdicts.items() if mask.any()]
            lines.append(f"- {label}: " + ("; ".join(parts) or "no verdict (fewer than two seeds)"))

    changes = length_changes(runs, long)
    if not changes.empty:
        lines += ["", "## Change with evaluation length", "",
                  f"Loss at each longer length minus the loss at {changes['ref'].iloc[0]} tokens, paired by seed "
                  "(the same model on the same text), mean over seeds; positive: worse at the longer length. "
                  "Within seed noise when |mean| < 2 × sd/√n of the per-seed differences.", ""]
        change_cols = [c for c in cols if c in set(changes.index.get_level_values("column"))]
        lines += markdown_table(_grid(changes.apply(_cell, axis=1), labels, change_cols))

    if len(labels) > 1:
        every = pairs(stats).reset_index()
        lines += ["", "## Pairs of schemes within seed noise", ""]
        for col in compared:
            mine = every[every["column"] == col]  # pairs in job order: label_b, then label
            found = "; ".join(f"{b} ≈ {a}" for a, b in mine.loc[mine["noise"].eq(True), ["label", "label_b"]].values)
            decided = mine["noise"].notna().any()
            lines.append(f"- {col}: " + ((found or "none") if decided else "no verdict (fewer than two seeds)"))
    caveats = consistency_notes(runs)
    lines += ["", "## Notes", ""] + [f"- {c}" for c in caveats] if caveats else []
    return "\n".join(lines) + "\n"


def plot_report(runs: pd.DataFrame, long: pd.DataFrame) -> tuple[Figure | None, str]:
    """The report's figure (None when no run has a loss to show) and its title: loss against
    evaluation length, one line per scheme (and protocol or split), when the sweep scored lengths;
    else val and test loss per scheme. Error bars: ± 1 std over seeds."""
    at, counts = _lengths(long), runs.groupby("label").size()
    scored = at["value"].notna().any()
    title = ("loss against evaluation length" if scored else "validation and test loss") + ": " + (
        "1 seed, no error bars" if counts.max() < 2 else f"mean ± 1 std over {_seeds(counts)}")
    if scored:
        stats = _agg(at, ["label", "variant", "length"]).rename(columns={"mean": "loss", "std": "loss_std"})
        curves = {f"{label} ({variant})" if variant else label: group
                  for (label, variant), group in stats.reset_index().groupby(["label", "variant"], sort=False)}
        block = runs["block_size"].dropna().unique()
        fig = plot_lengths(curves, int(block[0]) if len(block) == 1 else None, title=title)
        fig.set_size_inches(8, 4.5)  # room for a legend beside the axes, which nine schemes would cover
        ax = fig.axes[0]
    else:
        shown = long[long["metric"].isin(["val/loss", "test/loss"])]
        if shown["value"].isna().all():
            return None, title
        stats = _agg(shown, ["metric", "label"])
        labels = list(dict.fromkeys(runs["label"]))
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for k, metric in enumerate(m for m in ("val/loss", "test/loss") if m in stats.index):
            group = stats.loc[metric].reindex(labels)
            ax.errorbar(np.arange(len(labels)) + 0.15 * (k - 0.5), group["mean"], yerr=group["std"].fillna(0),
                        fmt="o", capsize=3, label=metric.replace("/", " "))
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set(xlim=(-0.5, len(labels) - 0.5), ylabel="loss (nats/token)", title=title)
        ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig, title


def lengthgen_summary(rows: pd.DataFrame, metric: str = "exact_match") -> pd.DataFrame:
    """Mean and sample std over seeds of a task sweep's scored rows (``task``, ``pos``, ``length``, ``status``,
    ``metric``: :class:`~dynpos.evaluation.lengthgen.LengthGenEval`'s), indexed by ``(task, pos, length)``,
    sorted, with ``runs``, ``<metric>`` and ``<metric>_std``: NaN for a group with an n/a run, std 0 for one run."""
    keys = [rows["task"], rows["pos"], rows["length"]]
    stats = rows.groupby(keys)[metric].agg(runs="size", mean="mean", std="std").fillna({"std": 0.0})
    stats.loc[rows["status"].ne("ok").groupby(keys).any(), ["mean", "std"]] = np.nan
    return stats.rename(columns={"mean": metric, "std": f"{metric}_std"})


def rank_schemes(summary: pd.DataFrame, limits: dict[str, int],
                 metric: str = "exact_match") -> tuple[pd.Series, pd.Series]:
    """Each scheme's rank per task and its mean reciprocal rank across tasks (Kazemnejad et al. 2023):
    ``(ranks indexed by (task, pos), mrr indexed by pos)``. A scheme's score on a task is its mean ``metric``
    of :func:`lengthgen_summary` over the lengths past the task's longest training length (``limits[task]``;
    n/a counts as 0); rank 1 is best, ties share the best rank they cover (competition ranking); MRR is the
    mean of ``1 / rank`` over the tasks.
    """
    rows = summary.reset_index()
    past = rows[rows["length"] > rows["task"].map(limits)]
    score = past[metric].fillna(0.0).groupby([past["task"], past["pos"]]).mean()
    ranks = score.groupby(level="task").rank(method="min", ascending=False).astype(int)
    return ranks, (1.0 / ranks).groupby(level="pos").sum() / ranks.index.unique("task").size


def lengthgen_markdown(root: Path, folder: Path) -> str:
    """The length-generalization section of a task sweep (``experiment=lengthgen``; empty for text
    sweeps) from every run's ``lengthgen/lengthgen.csv``: per metric, mean ± std over seeds per task,
    scheme and length, then :func:`rank_schemes`; writes ``lengthgen_<task>.png`` (exact match
    against length, one line per scheme) into ``folder``."""
    paths = sorted(root.rglob("lengthgen/lengthgen.csv"))
    if not paths:
        return ""
    rows = pd.concat([pd.read_csv(path, keep_default_na=False, na_values=[""]) for path in paths], ignore_index=True)
    limits = dict(zip(rows["task"], rows["train_max_length"]))
    lines = ["", "## Length generalization", ""]
    for metric in METRICS:
        summary = lengthgen_summary(rows, metric)
        cells = summary.apply(lambda r: "n/a" if pd.isna(r[metric]) else f"{r[metric]:.2f} ± {r[f'{metric}_std']:.2f}",
                              axis=1)
        table = cells.unstack("length", fill_value="").rename(columns=lambda n: f"@{n}")
        table.insert(0, "runs", summary["runs"].groupby(level=["task", "pos"]).first())
        lines += [f"{metric.replace('_', ' ')}, mean ± std over seeds (training lengths up to "
                  f"{', '.join(f'{t} {n}' for t, n in limits.items())}):", "", *markdown_table(table)]
        for task in (limits if metric == "exact_match" else ()):
            curves = dict(list(summary.loc[task].reset_index().groupby("pos", sort=False)))
            save_figure(plot_lengths(curves, limits[task], metric, f"{task}: exact match against length"),
                        folder / f"lengthgen_{task}.png")
            lines.append(f"![{task}: exact match against length](lengthgen_{task}.png)\n")
        ranks, mrr = rank_schemes(summary, limits, metric)
        lines += ["", f"Rank by mean {metric.replace('_', ' ')} past the training length: " + "; ".join(
            f"{task}: " + ", ".join(f"{pos} {r}" for pos, r in ranks[task].sort_values(kind="stable").items())
            for task in ranks.index.unique("task")) + ". Mean reciprocal rank: " + ", ".join(
            f"{pos} {value:.2f}" for pos, value in mrr.sort_values(ascending=False, kind="stable").items()) + ".", ""]
    return "\n".join(lines)


def write_report(sweep_dir: str | Path, baseline: str | None = None,
                 out: str | Path | None = None) -> tuple[str, Path, Path | None]:
    """Read a sweep, write ``report.md`` and ``report.png`` (and a task sweep's ``lengthgen_<task>.png``)
    into ``out`` (default ``sweep_dir``) and return ``(markdown, md path, png path or None)``.
    ``baseline`` is the label the others are compared with: default ``dpb`` when present, else the
    first label in job order.

    Raises the errors of :func:`load_sweep` and :func:`compare`, NotADirectoryError also for an ``out``
    that is a file, and FileExistsError when ``out`` holds a ``report.md`` or ``report.png`` that is not
    this sweep's report (a previous report of the same sweep is replaced).
    """
    root = Path(sweep_dir)
    runs, long = load_sweep(root)
    default = "dpb" if "dpb" in set(runs["label"]) else runs["label"][0]
    baseline = default if baseline is None else str(baseline)
    folder, md = Path(out or root), Path(out or root) / "report.md"
    if folder.is_file():
        raise NotADirectoryError(f"out={folder} is a file: give a folder for report.md and report.png")
    ours = folder.resolve() == root.resolve() or (md.is_file() and md.read_text(encoding="utf-8").startswith(
        f"# Sweep report: {root}\n"))
    if not ours and (md.exists() or (folder / "report.png").exists()):
        raise FileExistsError(f"out={folder} already holds a report.md or report.png that is not this sweep's "
                              "report: choose another out= folder or delete them")
    markdown = render_markdown(root, runs, long, baseline)  # a bad baseline fails before anything is drawn
    fig, title = plot_report(runs, long)
    png = None if fig is None else folder / "report.png"
    markdown += (f"\n![{title}]({png.name})\n" if png else "") + lengthgen_markdown(root, folder)
    if png:
        save_figure(fig, png)
    write_text(md, markdown)
    return markdown, md, png
