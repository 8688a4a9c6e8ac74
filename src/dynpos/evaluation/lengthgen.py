"""Length generalization: greedy exact match and per-token accuracy per length bucket on the tasks of
:mod:`dynpos.data.tasks`, scored as Kazemnejad et al. 2023 ("The Impact of Positional Encoding on Length
Generalization in Transformers", NeurIPS) do, with a row of ``n/a`` (not an error) for a length the scheme
cannot encode. Sweep statistics (mean over seeds, ranks, mean reciprocal rank): :mod:`dynpos.evaluation.report`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from dynpos.data.tasks import Example
from dynpos.evaluation.extrapolate import encodable, write_csv
from dynpos.evaluation.plots import plot_lengths, save_figure
from dynpos.model.attention import KVCache
from dynpos.training.callbacks import run_dir, wandb_loggers

METRICS = ("exact_match", "token_accuracy")


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: Tensor, max_new_tokens: int, end_id: int) -> Tensor:
    """Greedy continuation of ``prompts`` ``(B, P)`` (token ids) through a fresh KV cache, stopped once every
    row has produced ``end_id``: ``(B, m)`` int64 tokens, ``m <= max_new_tokens``, ``end_id`` after a row's
    first ``end_id``. ``model`` is a ``GPT`` or anything with its call signature (``model(idx, cache=KVCache)``
    returning ``(logits (B, t, V), _)``) and ``model.config.n_layer``.
    """
    cache = KVCache(model.config.n_layer)
    out = prompts[:, :0]  # (B, 0): the tokens made so far
    done = torch.zeros_like(prompts[:, 0], dtype=torch.bool)
    for step in range(max_new_tokens):
        logits, _ = model(out[:, -1:] if step else prompts, cache=cache)  # the prompt first, then the newest token
        nxt = logits[:, -1, :].argmax(dim=-1).masked_fill(done, end_id)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == end_id
        if bool(done.all()):
            break
    return out


def judge(decoded: Sequence[int], answer: Sequence[int]) -> tuple[bool, float]:
    """``(exact, per-token accuracy)`` of one decoded sequence against ``answer`` (end token last).

    The decoded tokens are cut after their first end token; exact means the cut sequence equals
    ``answer``; per-token accuracy is the fraction of the ``len(answer) - 1`` answer positions whose
    decoded token (before the end token) matches, so positions after an early end token count as
    wrong. An answer of only the end token has per-token accuracy 1.0 when exact, else 0.0.
    """
    end, decoded = answer[-1], list(decoded)
    cut = decoded[: decoded.index(end) + 1] if end in decoded else decoded
    content = cut[:-1] if cut and cut[-1] == end else cut
    exact = cut == list(answer)
    if len(answer) == 1:
        return exact, float(exact)
    return exact, sum(a == b for a, b in zip(content, answer[:-1])) / (len(answer) - 1)


def score(model: nn.Module, examples: Iterable[Example], batch_size: int = 64) -> list[dict]:
    """Exact match and per-token accuracy per length of ``model`` (a ``GPT``, see :func:`greedy_decode`;
    run on its device, in eval mode for the call) on ``examples`` (task instances, any mix of lengths;
    batched by equal prompt and answer lengths), greedy through the KV cache.

    One row per length, ascending: ``{"length", "n_tokens", "examples", "exact_match", "token_accuracy",
    "status"}`` with ``n_tokens`` the tokens of the longest example, accuracies in ``[0, 1]`` and status
    ``"ok"``, or ``"n/a"`` with ``None`` accuracies when the model reads ``prompt + answer - 1`` tokens
    more than its scheme can encode (``model.pos.max_length``).
    """
    device = next(model.parameters(), torch.empty(0)).device
    groups: dict[int, dict[tuple[int, int], list[Example]]] = defaultdict(lambda: defaultdict(list))
    for ex in examples:
        groups[ex.length][len(ex.prompt), len(ex.answer)].append(ex)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for length, shapes in sorted(groups.items()):
            n_tokens = max(p + a for p, a in shapes)
            row = {"length": length, "n_tokens": n_tokens, "examples": sum(len(v) for v in shapes.values())}
            if not encodable(model, n_tokens - 1):
                rows.append({**row, "exact_match": None, "token_accuracy": None, "status": "n/a"})
                continue
            judged = []  # (exact, per-token accuracy) per example
            for (_, a_len), exs in shapes.items():
                for start in range(0, len(exs), batch_size):
                    chunk = exs[start: start + batch_size]
                    prompts = torch.tensor([ex.prompt for ex in chunk], dtype=torch.int64, device=device)
                    out = greedy_decode(model, prompts, a_len, chunk[0].answer[-1]).tolist()
                    judged += [judge(decoded, ex.answer) for ex, decoded in zip(chunk, out)]
            rows.append({**row, "exact_match": sum(match for match, _ in judged) / len(judged),
                         "token_accuracy": sum(accuracy for _, accuracy in judged) / len(judged), "status": "ok"})
    finally:
        model.train(was_training)
    return rows


def metrics(rows: Sequence[dict], prefix: str = "lengthgen") -> dict[str, float]:
    """``<prefix>/exact@<length>`` and ``<prefix>/token@<length>`` of scored rows (n/a rows left out)."""
    return {f"{prefix}/{name}@{row['length']}": float(row[metric]) for row in rows if row["status"] == "ok"
            for name, metric in (("exact", "exact_match"), ("token", "token_accuracy"))}


class LengthGenEval(L.Callback):
    """Score length generalization after each validation (in ``fit`` and ``trainer.validate``, not in the
    sanity check) with a datamodule that has ``lengthgen_examples()``; with any other, do nothing.

    Logs ``lengthgen/exact@<n>`` and ``lengthgen/token@<n>`` through the LightningModule (so they reach every
    logger and ``trainer.callback_metrics``); on global rank 0 writes ``<run folder>/lengthgen/lengthgen.csv``
    and ``.png`` and logs the PNG to every wandb logger as ``lengthgen``. The model is ``pl_module.model``;
    ``rows`` holds the latest rows of :func:`score`, led by ``task``, ``pos`` and ``train_max_length`` (None before).
    """

    def __init__(self) -> None:
        self.rows: list[dict] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if trainer.sanity_checking or not hasattr(datamodule, "lengthgen_examples"):
            return
        model, task, limit = pl_module.model, datamodule.task.name, datamodule.max_length
        self.rows = [{"task": task, "pos": model.pos.name, "train_max_length": limit, **row}
                     for row in score(model, datamodule.lengthgen_examples(), datamodule.eval_batch_size)]
        if trainer.is_global_zero:
            out, label = run_dir(trainer) / "lengthgen", f"{task}, pos={model.pos.name}"
            write_csv(self.rows, out / "lengthgen.csv")
            save_figure(plot_lengths({label: self.rows}, limit, "exact_match", f"{label}: exact match against length"),
                        out / "lengthgen.png")
            for logger in wandb_loggers(trainer):
                logger.log_image(key="lengthgen", images=[str(out / "lengthgen.png")], step=trainer.global_step)
        pl_module.log_dict(metrics(self.rows), on_epoch=True, prog_bar=False)
