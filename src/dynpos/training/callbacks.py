"""dynpos's own callbacks: a text sample and a picture of the learned bias at each validation, and
the run's records.

Everything else (checkpoints, progress bar, throughput) is Lightning's own. All of them write only
on global rank 0.
"""

from __future__ import annotations

import csv
import datetime
import shutil
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from tokenizers import Tokenizer

from dynpos.atomic import write_json, write_text
from dynpos.evaluation.plots import plot_bias, save_figure


def run_dir(trainer: L.Trainer) -> Path:
    """The run folder: the trainer's ``default_root_dir``."""
    return Path(trainer.default_root_dir)


def batch_sequences(batch) -> int:
    """Sequences in a ``(x, y)`` batch (for Lightning's ``ThroughputMonitor``)."""
    return batch[0].shape[0]


def batch_tokens(batch) -> int:
    """Tokens in a ``(x, y)`` batch (for Lightning's ``ThroughputMonitor``)."""
    return batch[0].numel()


def during_fit(trainer: L.Trainer) -> bool:
    """Whether a validation belongs to ``fit`` (not the sanity check, nor ``trainer.validate`` after it)."""
    return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking


def wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar on a terminal; progress lines when the output goes to a pipe or file.

    The bar reads ``train`` instead of ``Epoch 0/-2``: dynpos trains one long epoch bounded by
    ``trainer.max_steps`` (``max_epochs`` is -1), so the epoch count says nothing. Rich draws a bar
    only on a terminal (into a file it prints once, at the end), so when stdout is not a terminal
    a line ``step 250/1000 | train/loss 1.8312 | 5,321 tokens/s | ETA 0:02:21`` is printed every
    ``line_every`` steps and at the last step.

    Args:
        line_every: steps between progress lines when stdout is not a terminal.
    """

    def __init__(self, line_every: int = 50, **kwargs) -> None:
        super().__init__(**kwargs)
        self.line_every = line_every
        self._start: tuple[float, int] | None = None

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if sys.stdout.isatty() or not trainer.is_global_zero or self._start is None:
            return
        if step % self.line_every and step != trainer.max_steps:
            return
        elapsed, done = time.monotonic() - self._start[0], step - self._start[1]
        rate = done / elapsed if elapsed > 0 else 0.0
        tokens = rate * batch_tokens(batch) * trainer.accumulate_grad_batches * trainer.world_size
        loss = trainer.callback_metrics.get("train/loss")
        left = (trainer.max_steps - step) / rate if rate > 0 and trainer.max_steps > 0 else 0
        print(f"step {step}/{trainer.max_steps}" + (f" | train/loss {float(loss):.4f}" if loss is not None else "")
              + f" | {tokens:,.0f} tokens/s | ETA {datetime.timedelta(seconds=round(left))}", flush=True)


class ValidateAtEnd(L.Callback):
    """Validate after the last training step too, so every run ends with a validation (and so a
    best checkpoint, a bias plot and a sample) whatever ``max_steps`` and ``val_check_interval``.

    Asks Lightning to stop at ``max_steps``: its loop then validates before it exits
    (``_should_check_val_fx``: a requested stop validates), once even where an interval falls there.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class TextSample(L.Callback):
    """Generate a sample from ``prompt`` after each validation; print it, append it to ``samples.txt``
    in the run folder and log it to wandb as a table row.

    Args:
        prompt: the text to continue (encoded with the datamodule's tokenizer); None = the first
            ``prompt_tokens`` tokens of the corpus's validation split, so every corpus is prompted
            with its own text.
        prompt_tokens: the length of that default prompt.
        max_new_tokens: tokens to generate; temperature, top_k: sampling settings.
    """

    def __init__(self, prompt: str | None = None, prompt_tokens: int = 16, max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 20, seed: int = 0) -> None:
        self.prompt, self.prompt_tokens, self.max_new_tokens = prompt, prompt_tokens, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.last: str | None = None

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not during_fit(trainer):
            return
        tokenizer, tokens = trainer.datamodule.tokenizer, getattr(trainer.datamodule, "tokens", {})
        if self.prompt is None and "validation" in tokens:
            ids = [int(t) for t in tokens["validation"][: self.prompt_tokens]]
        else:
            ids = tokenizer.encode(self.prompt or "\n").ids or [0]
        model = pl_module.model
        was_training = model.training
        model.eval()
        top_k = None if self.top_k is None else min(self.top_k, model.config.vocab_size)
        out = model.generate(torch.tensor([ids], device=pl_module.device), self.max_new_tokens,
                             temperature=self.temperature, top_k=top_k,
                             generator=torch.Generator(pl_module.device).manual_seed(self.seed))
        model.train(was_training)
        self.last = tokenizer.decode(out[0].tolist(), skip_special_tokens=False)
        step = trainer.global_step
        with open(run_dir(trainer) / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {step} ===\n{self.last}\n")
        for logger in wandb_loggers(trainer):
            logger.log_text(key="samples", columns=["step", "text"], data=[[step, self.last]])


class BiasPlot(L.Callback):
    """Save a PNG of each block's bias against distance per head (and head 0's bias grid) after each
    validation, as ``plots/bias_step<N>.png`` and ``plots/bias.png`` (the latest), and log it to wandb.

    Args:
        length: distances shown, ``0 .. length-1``; None means the model's ``block_size``.
    """

    def __init__(self, length: int | None = None) -> None:
        self.length = length
        self.path: Path | None = None

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not during_fit(trainer):
            return
        model = pl_module.model
        n = self.length or model.config.block_size
        step = trainer.global_step
        fig = plot_bias(model.pos, n, title=f"pos={model.pos.name}, step {step}")
        if fig is None:
            return
        folder = run_dir(trainer) / "plots"
        folder.mkdir(parents=True, exist_ok=True)
        stepped = folder / f"bias_step{step}.png"
        save_figure(fig, stepped)
        shutil.copyfile(stepped, folder / "bias.png")
        self.path = folder / "bias.png"
        for logger in wandb_loggers(trainer):
            logger.log_image(key="bias", images=[str(stepped)], step=step)


def csv_history(logger: CSVLogger, resume_step: int) -> list[tuple[int, dict[str, float]]]:
    """The rows of ``logger``'s existing ``metrics.csv`` logged before ``resume_step`` (the resumed
    checkpoint's global step), as ``(step, metrics)``; the later rows are left out, since the
    resumed run logs those steps again. Read before ``trainer.fit``: Lightning's CSV writer deletes
    an existing ``metrics.csv`` when the trainer sets up.
    """
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get("step") in (None, "") or float(row["step"]) >= resume_step:
                continue
            rows.append((int(float(row["step"])), {k: float(v) for k, v in row.items() if k != "step" and v}))
    return rows


class RunRecord(L.Callback):
    """Write the run's records into the run folder on global rank 0 only, at ``setup("fit")``,
    when the strategy has set the ranks (before that, a DDP child process cannot tell it is not
    rank 0): ``tokenizer.json``, ``versions.json``, and on resume the CSV log of the steps before
    the checkpoint (:func:`csv_history`), so ``metrics.csv`` reads as one uninterrupted run. (The
    config is Hydra's ``.hydra/config.yaml``; the loggers get it as the module's hyperparameters.)

    Args:
        out: the run folder.
        tokenizer: the datamodule's tokenizer.
        versions: ``dynpos.training.run_folder.package_versions()``.
        resume_step: the global step of the checkpoint being resumed, or None.
        loggers: the trainer's loggers; on resume their CSV history is read here, before ``fit``.
    """

    def __init__(self, out: Path, tokenizer: Tokenizer, versions: dict, resume_step: int | None = None,
                 loggers: list | None = None) -> None:
        self.out, self.tokenizer, self.versions = Path(out), tokenizer, versions
        self.history = {}
        if resume_step is not None:
            self.history = {id(lg): csv_history(lg, resume_step) for lg in loggers or [] if isinstance(lg, CSVLogger)}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        write_text(self.out / "tokenizer.json", self.tokenizer.to_str(pretty=True))
        write_json(self.out / "versions.json", self.versions)
        for logger in trainer.loggers:
            if self.history.get(id(logger)):
                for step, metrics in self.history[id(logger)]:
                    logger.experiment.log_metrics(metrics, step)
                logger.save()
