"""Sweep reports: a multirun folder of ``result.json`` files -> mean ± std per scheme, a plot, and
which differences are within the seed noise (each scheme against a baseline, each scheme's loss at
longer lengths against its loss at the training length, and every pair of schemes).

``python train.py -m experiment=ablate_pos pos=... seed=0,1,2`` writes one run folder per job,
``multirun/<date>_<time>/<num>_<run_name>_seed<seed>/result.json`` (see
:func:`dynpos.training.run.train`). :func:`write_report` reads every ``result.json`` below a folder,
groups the runs by what the sweep varied other than the seed (normally ``pos``), and writes
``report.md`` (printed by ``scripts/report.py``) and ``report.png`` (loss against evaluation length,
one line per scheme, error bars of one standard deviation over seeds).

The noise rule, stated once here and in the report: for a metric with per-seed values ``a`` (scheme)
and ``b`` (baseline), the difference of means ``d = mean(a) - mean(b)`` has the Welch standard error
``se = sqrt(s_a² / n_a + s_b² / n_b)`` (``s``: sample standard deviation, ``n``: seeds). A difference
is *within seed noise* when ``|d| < 2·se``. The change of one scheme's loss from the training length
to a longer one is paired by seed instead (the same model scores the same text at every length):
``se = sd(d_seed) / sqrt(n)``, same rule. With 3 seeds a side this is a lenient screen, not a
significance test: a Welch t-test at the 5% level would need ``|d| / se`` of about 2.8 to 4.3
(2 to 4 degrees of freedom), so differences just past 2·se deserve more seeds before they are
believed. ``t = d / se`` is printed so a reader can apply a stricter threshold.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Config keys that differ between the runs of any sweep without changing what is compared.
_BOOKKEEPING = ("seed", "run_name", "group", "paths.", "ckpt_path", "callbacks.", "logger.")
NOISE_RULE = "|mean difference| < 2 × Welch standard error sqrt(s₁²/n₁ + s₂²/n₂) over seeds"


@dataclass
class Run:
    """One run of a sweep, as read from its ``result.json``.

    Attributes:
        path: the run folder.
        label: what distinguishes its group (``dpb``; ``dpb, pos.log_distance=true``).
        seed: ``config.seed``.
        pos: the scheme's name (``result["pos"]``).
        num_params: trainable parameters.
        block_size: the training length in tokens (``config.model.block_size``).
        metrics: final metrics (``test/loss`` in nats/token, ``test/bpb`` in bits per byte, ...).
        lengths: ``{(protocol, length): loss in nats/token or None}`` from the extrapolation rows.
        notes: ``{(protocol, length): why the loss is None}`` (e.g. learned positions beyond block_size).
        config: the resolved training config.
    """

    path: Path
    label: str
    seed: int | None
    pos: str
    num_params: int | None
    block_size: int | None
    metrics: dict[str, float]
    lengths: dict[tuple[str, int], float | None]
    notes: dict[tuple[str, int], str]
    config: dict


@dataclass
class Stat:
    """Mean and sample standard deviation of one metric over ``n`` seeds (``std`` None for n < 2;
    both None for n = 0, with ``note`` saying why)."""

    mean: float | None
    std: float | None
    n: int
    note: str = ""

    @classmethod
    def of(cls, values: Iterable[float | None], note: str = "") -> "Stat":
        kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not kept:
            return cls(None, None, 0, note)
        return cls(statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else None, len(kept), note)

    def se2(self) -> float | None:
        """The squared standard error of the mean, ``std² / n``; None without a std."""
        return None if self.std is None else self.std**2 / self.n


@dataclass
class Summary:
    """The runs of one label: seeds, parameter counts and a :class:`Stat` per metric column."""

    label: str
    pos: str
    seeds: list[int | None]
    num_params: list[int]
    stats: dict[str, Stat] = field(default_factory=dict)


@dataclass
class Comparison:
    """``label`` minus the baseline for one metric column: ``diff`` (nats/token or bits per byte),
    Welch ``se``, ``t = diff / se`` and the verdict ``noise`` (True: within seed noise, False: beyond,
    None: undecidable, i.e. a side has fewer than two seeds or no value)."""

    label: str
    column: str
    diff: float | None
    se: float | None
    t: float | None
    noise: bool | None


def find_results(sweep_dir: str | Path) -> list[Path]:
    """Every ``result.json`` below ``sweep_dir``, in job order (numeric prefix of the run folder).

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist or is not a folder.
        ValueError: it holds no ``result.json`` (the message names the folder and what is expected).
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"sweep folder {root} does not exist: pass the folder that `python train.py -m ...` wrote "
            "(multirun/<date>_<time>)"
        )
    paths = sorted(root.rglob("result.json"), key=_job_order)
    if not paths:
        raise ValueError(
            f"{root} holds no result.json: expected the run folders of a sweep, "
            "<sweep dir>/<num>_<run>_seed<seed>/result.json as `python train.py -m ...` writes them "
            "(a run writes its result.json when it finishes)"
        )
    return paths


def _job_order(path: Path) -> tuple:
    head = path.parent.name.split("_", 1)[0]
    return (str(path.parent.parent), int(head) if head.isdigit() else math.inf, str(path))


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, sort_keys=True) if isinstance(value, list) else value
    return out


def _overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides (Hydra's ``.hydra/overrides.yaml``), or [] without one."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    return [str(item) for item in loaded]


def load_runs(sweep_dir: str | Path) -> list[Run]:
    """Read every ``result.json`` below ``sweep_dir`` and label each run.

    A run's label is built from the overrides that vary across the runs, the seed excluded:
    ``pos=<name>`` shows as ``<name>``, anything else as ``key=value`` (``dpb, pos.depth=3``). When
    no override varies (or the runs carry no ``.hydra`` folder) the label is the scheme's name.

    Raises:
        FileNotFoundError, ValueError: as :func:`find_results`; ValueError also for a
            ``result.json`` that is not valid JSON or lacks ``metrics`` (naming the file).
    """
    paths = find_results(sweep_dir)
    raw = []
    for path in paths:
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}): delete it or rerun that job") from None
        if not isinstance(result, dict) or "metrics" not in result:
            raise ValueError(f"{path} has no 'metrics': not a dynpos result.json (written by train.py)")
        raw.append((path, result, _overrides(path.parent)))

    def parse(override: str) -> tuple[str, str]:
        key, _, value = override.partition("=")
        return key.lstrip("+~"), value

    keyed = [dict(parse(o) for o in overrides) for _, _, overrides in raw]
    keys = sorted({k for d in keyed for k in d if k != "seed"})
    varying = [k for k in keys if len({d.get(k) for d in keyed}) > 1]
    runs = []
    for (path, result, _), overrides in zip(raw, keyed):
        config = result.get("config") or {}
        pos = str(result.get("pos") or (config.get("pos") or {}).get("_target_", "?"))
        parts = [overrides.get("pos", pos) if k == "pos" else f"{k}={overrides.get(k, '(default)')}"
                 for k in varying]
        if "pos" not in varying and varying:
            parts.insert(0, pos)
        lengths, notes = {}, {}
        for row in result.get("extrapolation") or []:
            key = (str(row.get("protocol")), int(row["length"]))
            lengths[key] = row.get("loss")
            if row.get("note"):
                notes[key] = str(row["note"])
        runs.append(Run(
            path=path.parent, label=", ".join(parts) if parts else pos, seed=config.get("seed"), pos=pos,
            num_params=result.get("num_params"), block_size=(config.get("model") or {}).get("block_size"),
            metrics={k: float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))},
            lengths=lengths, notes=notes, config=config,
        ))
    return runs


def columns(runs: list[Run]) -> list[tuple[str, str]]:
    """The metric columns ``(key, header)``: test loss and bpb, then the loss at each evaluation
    length (``loss@<length>``, with ``/<protocol>`` appended when a sweep used several)."""
    cols = [("test/loss", "test loss"), ("test/bpb", "test bpb")]
    keys = sorted({k for r in runs for k in r.lengths}, key=lambda k: (k[0], k[1]))
    protocols = {p for p, _ in keys}
    for protocol, length in keys:
        suffix = f"/{protocol}" if len(protocols) > 1 else ""
        cols.append((f"loss@{length}{suffix}", f"loss @{length}{' ' + protocol if suffix else ''}"))
    return cols


def _value(run: Run, column: str) -> float | None:
    if not column.startswith("loss@"):
        return run.metrics.get(column)
    length, _, protocol = column[len("loss@"):].partition("/")
    matches = [v for (p, n), v in run.lengths.items() if n == int(length) and (not protocol or p == protocol)]
    return matches[0] if matches else None


def _note(runs: list[Run], column: str) -> str:
    if not column.startswith("loss@"):
        return ""
    length = int(column[len("loss@"):].partition("/")[0])
    return next((note for r in runs for (_, n), note in r.notes.items() if n == length), "")


def summarize(runs: list[Run]) -> list[Summary]:
    """Group runs by label (in order of first appearance) and compute a :class:`Stat` per column."""
    cols = columns(runs)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    summaries = []
    for label, members in groups.items():
        summary = Summary(label=label, pos=members[0].pos, seeds=[r.seed for r in members],
                          num_params=sorted({r.num_params for r in members if r.num_params is not None}))
        for key, _ in cols:
            summary.stats[key] = Stat.of((_value(r, key) for r in members), _note(members, key))
        summaries.append(summary)
    return summaries


def _verdict(label: str, column: str, diff: float | None, se: float | None) -> Comparison:
    """A :class:`Comparison` from a difference and its standard error (rule: :data:`NOISE_RULE`)."""
    if diff is None or se is None:
        return Comparison(label, column, diff, None, None, None)
    t = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return Comparison(label, column, diff, se, t, abs(diff) < 2 * se if se > 0 else diff == 0)


def welch(label: str, column: str, a: Stat | None, b: Stat | None) -> Comparison:
    """``a - b`` for two independent groups of seeds, with the Welch standard error."""
    if a is None or b is None or a.mean is None or b.mean is None:
        return Comparison(label, column, None, None, None, None)
    if a.se2() is None or b.se2() is None:
        return _verdict(label, column, a.mean - b.mean, None)
    return _verdict(label, column, a.mean - b.mean, math.sqrt(a.se2() + b.se2()))


def compare(summaries: list[Summary], baseline: str) -> list[Comparison]:
    """Each label against ``baseline`` on every column, with the rule of :data:`NOISE_RULE`.

    Raises:
        ValueError: ``baseline`` is not one of the labels (the message lists them).
    """
    by_label = {s.label: s for s in summaries}
    if baseline not in by_label:
        raise ValueError(f"baseline={baseline!r} is not a scheme of this sweep: choose one of {', '.join(by_label)}")
    base = by_label[baseline]
    return [welch(s.label, key, stat, base.stats.get(key))
            for s in summaries if s.label != baseline for key, stat in s.stats.items()]


def pairs_within_noise(summaries: list[Summary]) -> dict[str, list[tuple[str, str]]]:
    """For each column, the pairs of labels whose difference is within seed noise (Welch, both
    sides with at least two seeds)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for key in (summaries[0].stats if summaries else {}):
        for i, a in enumerate(summaries):
            for b in summaries[i + 1:]:
                if welch(a.label, key, a.stats.get(key), b.stats.get(key)).noise:
                    out.setdefault(key, []).append((a.label, b.label))
    return out


def length_changes(runs: list[Run]) -> list[Comparison]:
    """How each label's loss moves from the training length to each longer evaluation length.

    Paired by seed (the same model scores the same text at every length): per seed
    ``d = loss@N - loss@train``, then the mean of ``d`` and its standard error ``sd(d) / sqrt(n)``
    with the ``2·se`` rule. The reference column is the evaluation length equal to the training
    length (``block_size``), else the shortest one; one comparison per label and longer column.
    """
    keys = [k for k, _ in columns(runs) if k.startswith("loss@")]
    if not keys:
        return []
    block = {r.block_size for r in runs}

    def length(key: str) -> int:
        return int(key[len("loss@"):].partition("/")[0])

    out = []
    for protocol in dict.fromkeys(k.partition("/")[2] for k in keys):
        mine = [k for k in keys if k.partition("/")[2] == protocol]
        ref = next((k for k in mine if length(k) in block and len(block) == 1), min(mine, key=length))
        labels = list(dict.fromkeys(r.label for r in runs))
        for label in labels:
            members = [r for r in runs if r.label == label]
            for key in mine:
                if length(key) <= length(ref):
                    continue
                diffs = [_value(r, key) - _value(r, ref) for r in members
                         if _value(r, key) is not None and _value(r, ref) is not None]
                if not diffs:
                    out.append(Comparison(label, key, None, None, None, None))
                elif len(diffs) < 2:
                    out.append(_verdict(label, key, diffs[0], None))
                else:
                    out.append(_verdict(label, key, statistics.fmean(diffs),
                                        statistics.stdev(diffs) / math.sqrt(len(diffs))))
    return out


def consistency_notes(runs: list[Run]) -> list[str]:
    """What a fair comparison should hold fixed but the runs do not: config keys (other than the
    scheme's own ``pos.*``, the seed, bookkeeping and paths into each run's own folder) that
    differ, and repeated (label, seed) pairs."""
    notes = []
    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f})

    def own_folder(key: str) -> bool:  # a path inside each run's own folder (trainer.default_root_dir, ...)
        return all(isinstance(f.get(key), str) and r.path.name in f[key] for f, r in zip(flat, runs))

    differ = [k for k in keys if not k.startswith("pos.") and not any(k == b or k.startswith(b) for b in _BOOKKEEPING)
              and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1 and not own_folder(k)]
    if differ:
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        notes.append(f"the runs differ in {shown}: not a like-for-like comparison")
    seen: dict[tuple[str, object], int] = {}
    for run in runs:
        seen[(run.label, run.seed)] = seen.get((run.label, run.seed), 0) + 1
    for (label, seed), count in seen.items():
        if count > 1:
            notes.append(f"{count} runs of {label} with seed {seed}: all are counted")
    return notes


def _fmt(stat: Stat, digits: int = 4) -> str:
    if stat.mean is None:
        return "n/a"
    return f"{stat.mean:.{digits}f}" + ("" if stat.std is None else f" ± {stat.std:.{digits}f}")


def _fmt_params(values: list[int]) -> str:
    if not values:
        return "?"
    return f"{values[0]:,}" if len(values) == 1 else f"{values[0]:,}–{values[-1]:,}"


def _cell(c: Comparison | None) -> str:
    if c is None or c.diff is None:
        return "n/a"
    if c.noise is None:
        return f"{c.diff:+.4f} (1 seed)"
    return f"{c.diff:+.4f} ≈" if c.noise else f"**{c.diff:+.4f}** (t={c.t:+.1f})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows])


def _where(headers: list[str], everything: int) -> str:
    return "everywhere" if len(headers) == everything and everything > 1 else ", ".join(headers)


def render_markdown(sweep_dir: Path, runs: list[Run], summaries: list[Summary], comparisons: list[Comparison],
                    baseline: str, png_name: str | None = "report.png") -> str:
    """The report as markdown: the mean ± std table; the differences from ``baseline``, how each
    scheme's loss changes with evaluation length, and which pairs of schemes are within seed noise
    (rule: :data:`NOISE_RULE`); any consistency notes; the plot."""
    cols = columns(runs)
    compared = [(k, h) for k, h in cols if k != "test/bpb"]  # bpb = loss / ln 2 / bytes per token: the same verdict
    block = sorted({r.block_size for r in runs if r.block_size})
    lines = [f"# Sweep report: {sweep_dir}", ""]
    lines.append(f"{len(runs)} runs, {len(summaries)} schemes, trained at "
                 f"{', '.join(map(str, block)) or '?'} tokens. Mean ± standard deviation over seeds; losses "
                 "in nats/token on the held-out splits (test: the test split's fixed windows at the training "
                 "length; loss @N: the validation split scored in windows of N tokens).")
    lines.append("")
    lines += _table(["scheme", "seeds", "params", *[h for _, h in cols]],
                    [[s.label, str(len(s.seeds)), _fmt_params(s.num_params), *[_fmt(s.stats[k]) for k, _ in cols]]
                     for s in summaries])
    notes = sorted({st.note for s in summaries for st in s.stats.values() if st.mean is None and st.note})
    if notes:
        lines.append("")
        lines.extend(f"n/a: {note}." for note in notes)
    lines += ["", f"Seed noise: a difference is within seed noise when {NOISE_RULE}. `≈` marks those, **bold** "
              "the differences beyond it, with t = difference / standard error. With 3 seeds a side a Welch "
              "t-test at 5% would need |t| of about 2.8–4.3, so treat |t| between 2 and 4 as suggestive."]

    others = [s.label for s in summaries if s.label != baseline]
    table = {(c.label, c.column): c for c in comparisons}
    if others:
        lines += ["", f"## Differences from {baseline}", "",
                  f"Scheme minus {baseline} (negative: lower loss than {baseline}).", ""]
        lines += _table(["scheme", *[h for _, h in compared]],
                        [[label, *[_cell(table.get((label, k))) for k, _ in compared]] for label in others])
        lines.append("")
        for label in others:
            mine = [(h, table.get((label, k))) for k, h in compared]
            known = [h for h, c in mine if c is not None and c.noise is not None]
            same = [h for h, c in mine if c is not None and c.noise]
            better = [h for h, c in mine if c is not None and c.noise is False and c.diff < 0]
            worse = [h for h, c in mine if c is not None and c.noise is False and c.diff > 0]
            parts = [f"within noise of {baseline}: {_where(same, len(known))}"] if same else []
            if better:
                parts.append(f"lower loss than {baseline}: {_where(better, len(known))}")
            if worse:
                parts.append(f"higher loss than {baseline}: {_where(worse, len(known))}")
            lines.append(f"- {label}: " + ("; ".join(parts) or "no verdict (fewer than two seeds)"))

    changes = length_changes(runs)
    if changes:
        change_cols = list(dict.fromkeys(c.column for c in changes))
        headers = dict(cols)
        ref = [k for k, _ in cols if k.startswith("loss@") and k not in change_cols]
        moved = {(c.label, c.column): c for c in changes}
        lines += ["", "## Change with evaluation length", "",
                  f"Loss at each longer length minus the loss at {ref[0][len('loss@'):] if ref else '?'} tokens, "
                  "paired by seed (the same model on the same text), mean over seeds; positive: worse at the "
                  "longer length. Within seed noise when |mean| < 2 × sd/√n of the per-seed differences.", ""]
        lines += _table(["scheme", *[headers[k] for k in change_cols]],
                        [[s.label, *[_cell(moved.get((s.label, k))) for k in change_cols]] for s in summaries])

    pairs = pairs_within_noise(summaries)
    if len(summaries) > 1:
        lines += ["", "## Pairs of schemes within seed noise", ""]
        for key, header in compared:
            found = pairs.get(key, [])
            decidable = any(welch("", key, a.stats.get(key), b.stats.get(key)).noise is not None
                            for i, a in enumerate(summaries) for b in summaries[i + 1:])
            verdict = "; ".join(f"{a} ≈ {b}" for a, b in found) if found else "none"
            lines.append(f"- {header}: " + (verdict if decidable else "no verdict (fewer than two seeds)"))
    caveats = consistency_notes(runs)
    if caveats:
        lines += ["", "## Notes", ""] + [f"- {c}" for c in caveats]
    if png_name:
        lines += ["", f"![loss against evaluation length]({png_name})"]
    return "\n".join(lines) + "\n"


def plot_report(summaries: list[Summary], runs: list[Run], title: str = ""):
    """Loss against evaluation length, one line per scheme (and protocol), error bars ± 1 std over
    seeds: a matplotlib Figure, or None when no run has extrapolation rows."""
    from dynpos.evaluation.plots import plot_lengths

    curves = {}
    for s in summaries:
        per_protocol: dict[str, list[dict]] = {}
        for key, stat in s.stats.items():
            if not key.startswith("loss@"):
                continue
            length, _, protocol = key[len("loss@"):].partition("/")
            per_protocol.setdefault(protocol, []).append(
                {"length": int(length), "loss": stat.mean, "loss_std": stat.std})
        for protocol, rows in per_protocol.items():
            curves[f"{s.label} ({protocol})" if protocol else s.label] = rows
    if not any(r["loss"] is not None for rows in curves.values() for r in rows):
        return None
    block = sorted({r.block_size for r in runs if r.block_size})
    fig = plot_lengths(curves, block[0] if len(block) == 1 else None, title=title)
    fig.set_size_inches(8, 4.5)  # room for a legend beside the axes, which nine schemes would cover
    ax = fig.axes[0]
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def write_report(sweep_dir: str | Path, baseline: str | None = None) -> tuple[str, Path, Path | None]:
    """Read a sweep, write ``report.md`` and ``report.png`` into it, and return
    ``(markdown, md path, png path or None)``.

    Args:
        sweep_dir: the multirun folder (any folder with ``result.json`` files below it).
        baseline: the label the others are compared with; default ``dpb`` when present, else the
            first label in job order.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_runs` and :func:`compare`.
    """
    from dynpos.evaluation.plots import save_figure

    root = Path(sweep_dir)
    runs = load_runs(root)
    summaries = summarize(runs)
    labels = [s.label for s in summaries]
    baseline = baseline or ("dpb" if "dpb" in labels else labels[0])
    comparisons = compare(summaries, baseline)
    seeds = sorted({len(s.seeds) for s in summaries})
    fig = plot_report(summaries, runs, title=f"loss against evaluation length: mean ± 1 std over "
                                             f"{'–'.join(map(str, seeds))} seed{'s' if seeds[-1] > 1 else ''}")
    png = None
    if fig is not None:
        png = root / "report.png"
        save_figure(fig, png)
    markdown = render_markdown(root, runs, summaries, comparisons, baseline, png.name if png else None)
    md = root / "report.md"
    tmp = md.with_name(md.name + ".tmp")
    tmp.write_text(markdown, encoding="utf-8")
    tmp.replace(md)
    return markdown, md, png
