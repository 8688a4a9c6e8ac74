"""Length generalization: greedy exact match and per-token accuracy per length bucket.

The scoring of Kazemnejad et al. 2023 ("The Impact of Positional Encoding on Length
Generalization in Transformers", NeurIPS) on the tasks of :mod:`dynpos.data.tasks`: each prompt
is decoded greedily through the model's KV cache (``GPT.forward(idx, cache=KVCache(...))``) until
the end token, for at most ``len(answer)`` tokens (the answer and its end token). Per example:

* exact match: the decoded tokens equal the answer and its end token;
* per-token accuracy: the fraction of answer positions ``k`` (end token not counted) where the
  ``k``-th decoded token equals the ``k``-th answer token; positions after an early end token
  count as wrong.

Rows (one per length) are means over the examples of that length. A scheme that cannot encode a
length (``model.pos.max_length`` smaller than the tokens the model must read, e.g. ``pos=learned``
past its table) gets a row with ``status="n/a"`` and ``None`` accuracies instead of an error.

Also here: the CSV and PNG writers, a Lightning callback that scores at each validation, and the
sweep summary (mean and std over seeds, rank of each scheme per task, mean reciprocal rank).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from dynpos.data.tasks import Example
from dynpos.evaluation.extrapolate import write_csv
from dynpos.evaluation.plots import plot_lengths, save_figure
from dynpos.model.attention import KVCache
from dynpos.training.callbacks import run_dir, wandb_loggers

METRICS = ("exact_match", "token_accuracy")


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: Tensor, max_new_tokens: int, end_id: int) -> Tensor:
    """Greedy continuation of ``prompts`` through a fresh KV cache, stopped once every row has
    produced ``end_id``.

    Args:
        model: a ``GPT`` (or anything with its call signature: ``model(idx, cache=KVCache)``
            returning ``(logits (B, t, V), _)``, and ``model.config.n_layer``).
        prompts: ``(B, P)`` token ids, all rows of the same length.
        max_new_tokens: at most this many tokens per row.

    Returns:
        ``(B, m)`` int64 decoded tokens, ``m <= max_new_tokens`` (fewer when every row ended);
        after a row's first ``end_id`` its tokens are ``end_id``.
    """
    cache = KVCache(model.config.n_layer)
    logits, _ = model(prompts, cache=cache)
    out: list[Tensor] = []
    done = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)
    for step in range(max_new_tokens):
        nxt = logits[:, -1, :].argmax(dim=-1)
        nxt = nxt.masked_fill(done, end_id)
        out.append(nxt)
        done |= nxt == end_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits, _ = model(nxt[:, None], cache=cache)
    if not out:
        return prompts.new_zeros(prompts.shape[0], 0)
    return torch.stack(out, dim=1)


def judge(decoded: Sequence[int], answer: Sequence[int]) -> tuple[bool, float]:
    """``(exact, per-token accuracy)`` of one decoded sequence against ``answer`` (end token last).

    The decoded tokens are cut after their first end token (``answer[-1]``); exact means the cut
    sequence equals ``answer``; per-token accuracy is the fraction of the ``len(answer) - 1``
    answer positions whose decoded token (before the end token) matches. An answer of only the end
    token has per-token accuracy 1.0 when exact, else 0.0.
    """
    end = answer[-1]
    decoded = list(decoded)
    cut = decoded[: decoded.index(end) + 1] if end in decoded else decoded
    content = cut[:-1] if cut and cut[-1] == end else cut
    exact = cut == list(answer)
    m = len(answer) - 1
    if m == 0:
        return exact, float(exact)
    hits = sum(a == b for a, b in zip(content, answer[:-1]))
    return exact, hits / m


def encodable(model: nn.Module, n_tokens: int) -> bool:
    """Whether the model's scheme can encode ``n_tokens`` positions (``pos.max_length`` None or larger)."""
    limit = getattr(getattr(model, "pos", None), "max_length", None)
    return limit is None or n_tokens <= limit


def score(model: nn.Module, examples: Iterable[Example], batch_size: int = 64,
          device: torch.device | str | None = None) -> list[dict]:
    """Exact match and per-token accuracy per length, greedy through the KV cache.

    Args:
        model: a ``GPT`` (see :func:`greedy_decode`); put in eval mode for the call, then restored.
        examples: task instances (:class:`dynpos.data.tasks.Example`), any mix of lengths.
        batch_size: prompts decoded together (rows with equal prompt and answer lengths).
        device: where to run; default the model's.

    Returns:
        One row per length, ascending: ``{"length", "n_tokens", "examples", "exact_match",
        "token_accuracy", "status"}`` with ``n_tokens`` the tokens of the longest example, accuracies in
        ``[0, 1]`` and status ``"ok"``, or ``"n/a"`` with ``None`` accuracies when the model reads
        ``prompt + answer - 1`` tokens more than its scheme can encode.
    """
    device = torch.device(device) if device is not None else _device(model)
    groups: dict[int, dict[tuple[int, int], list[Example]]] = defaultdict(lambda: defaultdict(list))
    for ex in examples:
        groups[ex.length][len(ex.prompt), len(ex.answer)].append(ex)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for length in sorted(groups):
            shapes = groups[length]
            n_tokens = max(p + a for p, a in shapes)
            count = sum(len(v) for v in shapes.values())
            row = {"length": length, "n_tokens": n_tokens, "examples": count}
            if not encodable(model, n_tokens - 1):
                rows.append({**row, "exact_match": None, "token_accuracy": None, "status": "n/a"})
                continue
            exact = tokens = 0.0
            for (_, a_len), exs in shapes.items():
                for start in range(0, len(exs), batch_size):
                    chunk = exs[start: start + batch_size]
                    prompts = torch.tensor([ex.prompt for ex in chunk], dtype=torch.int64, device=device)
                    end = chunk[0].answer[-1]
                    decoded = greedy_decode(model, prompts, a_len, end).tolist()
                    for ex, out in zip(chunk, decoded):
                        e, t = judge(out, ex.answer)
                        exact += e
                        tokens += t
            rows.append({**row, "exact_match": exact / count, "token_accuracy": tokens / count, "status": "ok"})
    finally:
        model.train(was_training)
    return rows


def metrics(rows: Sequence[dict], prefix: str = "lengthgen") -> dict[str, float]:
    """Scalar metrics of scored rows: ``<prefix>/exact@<length>`` and ``<prefix>/token@<length>`` (n/a rows left out)."""
    out = {}
    for row in rows:
        if row["status"] == "ok":
            out[f"{prefix}/exact@{row['length']}"] = float(row["exact_match"])
            out[f"{prefix}/token@{row['length']}"] = float(row["token_accuracy"])
    return out


def plot_accuracy(curves: dict[str, Sequence[dict]], train_length: int | None = None,
                  metric: str = "exact_match", title: str = ""):
    """Accuracy against length, one line per label (scheme); ``<metric>_std`` gives error bars.

    Returns a matplotlib ``Figure`` (``dynpos.evaluation.plots.plot_lengths`` with accuracy axes).
    """
    fig = plot_lengths({k: list(v) for k, v in curves.items()}, train_length, metric=metric, title=title)
    ax = fig.axes[0]
    ax.set_xlabel("length (task units)")
    ax.set_ylabel({"exact_match": "exact-match accuracy", "token_accuracy": "per-token accuracy"}.get(metric, metric))
    ax.set_ylim(-0.03, 1.03)
    return fig


def write_outputs(rows: Sequence[dict], out_dir: str | Path, label: str, train_length: int | None = None,
                  name: str = "lengthgen") -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.csv`` (the rows) and ``<name>.png`` (exact match against length), atomically.

    Returns:
        ``(csv path, png path)``.
    """
    out = Path(out_dir)
    csv_path, png_path = out / f"{name}.csv", out / f"{name}.png"
    write_csv(list(rows), csv_path)
    save_figure(plot_accuracy({label: rows}, train_length, title=f"{label}: exact match against length"), png_path)
    return csv_path, png_path


def evaluate_datamodule(model: nn.Module, datamodule, out_dir: str | Path | None = None) -> list[dict]:
    """Score ``datamodule.lengthgen_examples()`` (a set-up ``TaskDataModule``); write CSV and PNG
    into ``out_dir`` when given. Rows carry ``task`` and ``pos`` (the scheme's name) first."""
    rows = score(model, datamodule.lengthgen_examples(), batch_size=datamodule.eval_batch_size)
    pos = getattr(getattr(model, "pos", None), "name", "model")
    rows = [{"task": datamodule.task.name, "pos": pos, "train_max_length": datamodule.max_length, **r} for r in rows]
    if out_dir is not None:
        write_outputs(rows, out_dir, f"{datamodule.task.name}, pos={pos}", datamodule.max_length)
    return rows


class LengthGenEval(L.Callback):
    """Score length generalization after each validation (during ``fit`` and in ``trainer.validate``,
    not in the sanity check).

    Needs a datamodule with ``lengthgen_examples()`` (:class:`~dynpos.data.tasks.TaskDataModule`);
    does nothing with any other (so it can sit in the default callbacks). Logs
    ``lengthgen/exact@<n>`` and ``lengthgen/token@<n>`` through the LightningModule (so they reach
    every logger and ``trainer.callback_metrics``: ``trainer.validate`` with the best checkpoint
    after ``fit`` leaves that checkpoint's scores there and in ``rows``); on global rank 0 it writes
    ``<run folder>/lengthgen/lengthgen.csv`` and ``lengthgen.png`` (the latest) and logs the PNG to
    every wandb logger as ``lengthgen``. The model is ``pl_module.model``.

    Attributes:
        rows: the latest scored rows (None before the first validation).
    """

    def __init__(self, folder: str = "lengthgen") -> None:
        self.folder = folder
        self.rows: list[dict] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if trainer.sanity_checking or not hasattr(datamodule, "lengthgen_examples"):
            return
        out = run_dir(trainer) / self.folder if trainer.is_global_zero else None
        self.rows = evaluate_datamodule(pl_module.model, datamodule, out)
        pl_module.log_dict(metrics(self.rows), on_epoch=True, prog_bar=False)
        if out is not None:
            for logger in wandb_loggers(trainer):
                logger.log_image(key="lengthgen", images=[str(out / "lengthgen.png")], step=trainer.global_step)


def summarize(rows: Iterable[dict], metric: str = "exact_match") -> list[dict]:
    """Mean and sample std over seeds of a sweep's rows, per ``(task, pos, length)``.

    Args:
        rows: scored rows of many runs, each with ``task``, ``pos``, ``length``, ``status`` and
            ``metric`` (as :func:`evaluate_datamodule` returns them; the seed need not be given).

    Returns:
        Rows ``{"task", "pos", "length", "runs", metric, f"{metric}_std", "status"}`` sorted by task,
        scheme and length; a group with any n/a run is n/a (mean and std None); std is 0.0 for one run.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["task"], row["pos"], row["length"]].append(row)
    out = []
    for (task, pos, length), runs in sorted(groups.items()):
        row = {"task": task, "pos": pos, "length": length, "runs": len(runs)}
        if any(r["status"] != "ok" for r in runs):
            out.append({**row, metric: None, f"{metric}_std": None, "status": "n/a"})
            continue
        values = [float(r[metric]) for r in runs]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        out.append({**row, metric: mean, f"{metric}_std": std, "status": "ok"})
    return out


def rank_schemes(summary: Iterable[dict], train_max_length: dict[str, int] | int,
                 metric: str = "exact_match") -> tuple[dict[str, dict[str, int]], dict[str, float]]:
    """Rank the schemes per task and their mean reciprocal rank across tasks (Kazemnejad et al. 2023).

    A scheme's score on a task is its mean ``metric`` over the lengths past the task's longest
    training length (n/a counts as 0); rank 1 is best, ties share the best rank they cover
    (competition ranking). MRR is the mean of ``1 / rank`` over the tasks.

    Args:
        summary: rows of :func:`summarize`.
        train_max_length: the longest training length, one for all tasks or per task.

    Returns:
        ``(ranks, mrr)``: ``ranks[task][pos]`` and ``mrr[pos]``.
    """
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in summary:
        limit = train_max_length[row["task"]] if isinstance(train_max_length, dict) else train_max_length
        if row["length"] > limit:
            scores[row["task"]][row["pos"]].append(row[metric] or 0.0)
    ranks: dict[str, dict[str, int]] = {}
    for task, per_pos in scores.items():
        mean = {pos: sum(v) / len(v) for pos, v in per_pos.items()}
        ranks[task] = {pos: 1 + sum(other > m for other in mean.values()) for pos, m in mean.items()}
    schemes = sorted({pos for r in ranks.values() for pos in r})
    mrr = {pos: sum(1.0 / r[pos] for r in ranks.values() if pos in r) / len(ranks) for pos in schemes}
    return ranks, mrr


__all__ = [
    "METRICS",
    "LengthGenEval",
    "encodable",
    "evaluate_datamodule",
    "greedy_decode",
    "judge",
    "metrics",
    "plot_accuracy",
    "rank_schemes",
    "score",
    "summarize",
    "write_outputs",
]
