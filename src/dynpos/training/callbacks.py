"""dynpos's own callbacks: non-TTY progress lines, a text sample and a picture of the learned bias at each
validation, and the run's records (checkpoints and throughput are Lightning's own); all write on global rank 0 only.
Also the wandb logger they log to, which needs no account (:func:`wandb_logger`).
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import shutil
import subprocess
import sys
import time
import uuid
from importlib.metadata import distributions
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console

from dynpos.atomic import write_json, write_text
from dynpos.evaluation.plots import plot_bias, save_figure

PACKAGES = ("dynpos", "torch", "lightning", "torchmetrics", "hydra-core", "omegaconf", "datasets", "tokenizers",
            "numpy", "pandas", "wandb")


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


def run_id(save_dir: str | os.PathLike) -> str:
    """The wandb run id of a run folder: ``<save_dir>/wandb_id``, made (8 hex digits) and written the first time."""
    path = Path(save_dir) / "wandb_id"
    if not path.is_file():
        write_text(path, uuid.uuid4().hex[:8])
    return path.read_text().strip()


def wandb_logger(**kwargs) -> WandbLogger:
    """A Lightning ``WandbLogger`` (``kwargs``: project, name, group, tags, save_dir) that never asks for an account.

    Offline when ``WANDB_MODE`` is ``offline``/``disabled`` or no API key is found (``WANDB_API_KEY`` or a
    ``wandb login`` entry in ~/.netrc); it then prints the ``wandb sync`` command that uploads the run later.
    The run id is :func:`run_id`'s and an existing run continues (``resume="allow"``): one wandb run per run folder,
    also on resume (the failure of lightning-hydra-template issue #128).
    """
    save_dir = kwargs.get("save_dir", ".")
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    has_key = os.environ.get("WANDB_API_KEY") or netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    mode = os.environ.get("WANDB_MODE", "")
    offline = mode in ("offline", "disabled") or not has_key
    if offline and mode != "disabled":
        os.environ["WANDB_MODE"] = "offline"
        Console(stderr=True, soft_wrap=True).print(f"wandb: no API key, logging offline under {save_dir}/wandb; "
                                                   "upload later with `wandb sync <that folder>/offline-run-*`")
    logger = WandbLogger(offline=offline, id=run_id(save_dir), resume="allow", **kwargs)
    # Lightning passes anonymous=None to wandb.init, and wandb >= 0.19 warns that the setting "has no
    # effect" whenever the key is present: dynpos never sets it, so the key goes.
    logger._wandb_init.pop("anonymous", None)
    return logger


class ProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, reading ``train`` (not ``Epoch 0/-2``: one epoch of ``max_steps``); when
    stdout is not a terminal (Rich then prints once, at the end), a line
    ``step 250/1000 | train/loss 1.8312 | 5,321 tokens/s | ETA 0:02:21`` every ``line_every`` steps and at the last.
    """

    def __init__(self, line_every: int = 50, **kwargs) -> None:
        super().__init__(**kwargs)
        self.line_every = line_every

    def _get_train_description(self, current_epoch: int) -> str:
        return "train"

    @property
    def total_train_batches(self) -> int:
        """``max_steps``: the bar counts optimizer steps of the whole run (Lightning's total is the batches left
        and its count the epoch's batch index, which a resume may continue: ``625/1749`` at step 625 of 2,000)."""
        return self.trainer.max_steps

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, trainer.global_step)  # a resumed run starts at its step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, step - 1)  # the bar counts optimizer steps
        if sys.stdout.isatty() or not trainer.is_global_zero or (step % self.line_every and step != trainer.max_steps):
            return
        rate = (step - self._start[1]) / max(time.monotonic() - self._start[0], 1e-9)
        tokens = rate * batch_tokens(batch) * trainer.accumulate_grad_batches * trainer.world_size
        losses = "".join(f" | {k} {float(trainer.callback_metrics[k]):.4f}" for k in ("train/loss", "val/loss")
                         if k in trainer.callback_metrics)
        left = datetime.timedelta(seconds=round((trainer.max_steps - step) / rate if rate > 0 else 0))
        print(f"step {step}/{trainer.max_steps}{losses} | {tokens:,.0f} tokens/s | ETA {left}", flush=True)


class TextSample(L.Callback):
    """Generate a sample after each validation; append it to ``samples.txt`` in the run folder and log it to wandb
    as a table row (the run prints the last one at its end). Options: ``configs/callbacks/default.yaml``.
    """

    def __init__(self, prompt: str | None = None, prompt_tokens: int = 16, max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: int | None = 20, seed: int = 0) -> None:
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
        model = pl_module.model  # in eval mode: Lightning restores train mode after this hook
        top_k = None if self.top_k is None else min(self.top_k, model.config.vocab_size)
        out = model.generate(torch.tensor([ids], device=pl_module.device), self.max_new_tokens,
                             temperature=self.temperature, top_k=top_k,
                             generator=torch.Generator(pl_module.device).manual_seed(self.seed))
        self.last = tokenizer.decode(out[0].tolist(), skip_special_tokens=False)
        with open(run_dir(trainer) / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== step {trainer.global_step} ===\n{self.last}\n")
        for logger in wandb_loggers(trainer):
            logger.log_text(key="samples", columns=["step", "text"], data=[[trainer.global_step, self.last]])


class BiasPlot(L.Callback):
    """Save a PNG of each block's bias against distance ``0 .. length-1`` (None: ``block_size``) per head, and head
    0's bias grid, after each validation as ``plots/bias_step<N>.png`` and ``plots/bias.png`` (the latest), and log
    it to wandb.
    """

    def __init__(self, length: int | None = None) -> None:
        self.length = length
        self.path: Path | None = None

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not during_fit(trainer):
            return
        model, step = pl_module.model, trainer.global_step
        fig = plot_bias(model.pos, self.length or model.config.block_size, title=f"pos={model.pos.name}, step {step}")
        if fig is None:
            return
        stepped = run_dir(trainer) / "plots" / f"bias_step{step}.png"
        save_figure(fig, stepped)
        self.path = shutil.copyfile(stepped, stepped.parent / "bias.png")
        for logger in wandb_loggers(trainer):
            logger.log_image(key="bias", images=[str(stepped)], step=step)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=10,
                              check=True, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.strip()  # read-only
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict:
    """Python, platform, CUDA, the versions of :data:`PACKAGES` and, when dynpos runs from a git checkout,
    ``git``: ``{"commit": sha, "dirty": bool}``. Nothing from the environment is recorded."""
    commit = _git("rev-parse", "HEAD")
    git = {"commit": commit, "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))} if commit else None
    packages = {name: next((d.version for d in distributions(name=name)), None) for name in PACKAGES}
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": packages,
            "cuda": torch.version.cuda, "git": git}


def _csv_rows(logger: CSVLogger, before: int) -> list[tuple[int, dict[str, float]]]:
    """``(step, metrics)`` of each row of ``logger``'s ``metrics.csv`` logged before step ``before``."""
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [(int(float(row["step"])), {k: float(v) for k, v in row.items() if k != "step" and v})
                for row in csv.DictReader(f) if float(row["step"]) < before]


class RunRecord(L.Callback):
    """Write the datamodule's ``tokenizer.json`` and :func:`package_versions` (``versions.json``; also
    ``self.versions``) into the run folder at ``setup("fit")``, when even a DDP child process knows it is not rank 0.
    On resume from step ``resume_step``, write back each CSV logger's ``metrics.csv`` rows before that step (read at
    construction: Lightning's CSV writer deletes the file in setup), so it reads as one uninterrupted run.
    """

    def __init__(self, resume_step: int | None = None, loggers: list | None = None) -> None:
        self.versions = package_versions()
        self.history = [(lg, _csv_rows(lg, resume_step)) for lg in loggers or []
                        if resume_step is not None and isinstance(lg, CSVLogger)]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        write_text(run_dir(trainer) / "tokenizer.json", trainer.datamodule.tokenizer.to_str(pretty=True))
        write_json(run_dir(trainer) / "versions.json", self.versions)
        for logger, rows in self.history:
            for step, metrics in rows:
                logger.experiment.log_metrics(metrics, step)
            logger.save()
