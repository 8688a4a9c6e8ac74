"""dynpos's own callbacks: a text sample and a picture of the learned bias at each validation.

Everything else (checkpoints, learning-rate monitor, progress bar, throughput) is Lightning's own.
Both callbacks write only on global rank 0.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

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


class TextSample(L.Callback):
    """Generate a sample from ``prompt`` after each validation; print it, append it to ``samples.txt``
    in the run folder and log it to wandb as a table row.

    Args:
        prompt: the text to continue (encoded with the datamodule's tokenizer).
        max_new_tokens: tokens to generate; temperature, top_k: sampling settings.
    """

    def __init__(self, prompt: str = "\n", max_new_tokens: int = 200, temperature: float = 0.8,
                 top_k: int | None = 20, seed: int = 0) -> None:
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.last: str | None = None

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not during_fit(trainer):
            return
        tokenizer = trainer.datamodule.tokenizer
        ids = tokenizer.encode(self.prompt).ids or [0]
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
