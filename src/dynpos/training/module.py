"""The LightningModule: next-token loss, AdamW groups, warmup + cosine schedule, exact metrics in nats and bits
per byte. Lightning owns the loop, precision, gradient clipping, checkpointing and strategies."""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor
from torchmetrics import SumMetric

from dynpos.data.datamodule import step_seed
from dynpos.model.gpt import compile_model
from dynpos.training.checkpoint import build_model


def lr_lambda(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier at ``step``: linear warmup ``(step + 1) / (warmup_steps + 1)`` (nanoGPT's rule,
    non-zero at step 0), then cosine from 1 down to ``min_ratio`` at ``decay_steps``, and ``min_ratio`` after."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


class LitGPT(L.LightningModule):
    """A :class:`~dynpos.model.gpt.GPT` trained with next-token cross-entropy.

    Args:
        config: the whole resolved run config (``configs/train.yaml``), saved once, as the hyperparameters, in
            every checkpoint.
        vocab_size: from the tokenizer (``model.vocab_size`` when that is set instead).
        bytes_per_token: UTF-8 bytes per token of each split, for ``bpb = loss / ln 2 / bytes_per_token``.

    Logs ``train/loss`` (nats/token), ``train/lr``, ``train/tokens`` and ``val/`` and ``test/`` ``loss``, ``ppl``,
    ``bpb``: exact token-weighted means over every scored target, summed across ranks, not means of batch means.
    Training stops at ``max_steps`` with a validation, and with ``FloatingPointError`` (naming the step, learning
    rate and precision) at the first non-finite loss or weights, which are never checkpointed.
    """

    def __init__(self, config: dict, vocab_size: int, bytes_per_token: dict[str, float] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(config, vocab_size)
        if self.model.config.compile:
            compile_model(self.model)  # in place: the state dict keeps its keys (no ``_orig_mod.``)
        self.optim = config["optim"]
        self.bytes_per_token = bytes_per_token or {}
        self.seed = config["seed"]
        # a NaN stays NaN (torchmetrics would drop it with a warning), so that divergence is caught at the epoch's end
        self.eval_nats = SumMetric(nan_strategy="disable")
        self.eval_targets = SumMetric(nan_strategy="disable")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Refuse non-finite weights (``FloatingPointError``); flush the loggers up to the checkpoint's step."""
        bad = next((k for k, v in checkpoint.get("state_dict", {}).items()
                    if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()), None)
        if bad is not None:
            raise self._diverged(f"parameters became non-finite by step {self.global_step} ({bad}), so no "
                                 "checkpoint was written and the last good one stays")
        for logger in self.loggers:
            logger.save()

    def _diverged(self, what: str) -> FloatingPointError:
        """The error to raise: ``<what> (optim.lr=..., at this step ...; trainer.precision=...): <what to change>``."""
        peak, precision = self.optim["lr"], str(getattr(self._trainer, "precision", "32-true"))
        lr = self._trainer.optimizers[0].param_groups[0]["lr"] if getattr(self._trainer, "optimizers", None) else peak
        fix = "" if precision.startswith(("32", "64")) else " or use trainer.precision=32-true"
        return FloatingPointError(f"{what} (optim.lr={peak:g}, at this step {lr:.3g}; trainer.precision={precision}): "
                                  f"lower optim.lr (or lengthen optim.warmup_steps){fix}")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # dropout re-seeded by the rule that draws the windows: a resumed run makes the same random choices
        accumulate = self.trainer.accumulate_grad_batches
        micro_batch = self.global_step * accumulate + batch_idx % accumulate
        torch.manual_seed(step_seed(self.seed, micro_batch, self.global_rank))

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if hasattr(self.model.pos, "project_"):  # a scheme's constraint after each step (KERPLE)
            self.model.pos.project_()
        if 0 < self.trainer.max_steps <= self.global_step:  # a requested stop validates before the loop exits
            self.trainer.should_stop = True

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        if not torch.isfinite(loss):
            raise self._diverged(f"non-finite training loss {loss.item()} at step {self.global_step}")
        self.flops_per_batch = self.model.flops_per_token(y.shape[1]) * y.numel()  # for ThroughputMonitor
        tokens = (self.global_step + 1) * y.numel() * self.trainer.world_size
        # sync_dist: under DDP the logged loss is the global batch's, not rank 0's share of it
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=True)
        self.log("train/tokens", float(tokens), on_step=True, on_epoch=False)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        targets = (y != -1).sum()
        self.eval_nats.update(loss.double() * targets)
        self.eval_targets.update(targets.double())

    test_step = validation_step

    def on_validation_epoch_end(self) -> None:
        split, prefix = ("test", "test") if self.trainer.testing else ("validation", "val")
        loss = (self.eval_nats.compute() / self.eval_targets.compute()).float()
        self.eval_nats.reset()
        self.eval_targets.reset()
        if not torch.isfinite(loss):  # before any callback samples from, plots or checkpoints the weights
            raise self._diverged(f"non-finite {split} loss {loss.item()} at step {self.global_step}: the weights "
                                 "diverged")
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val")
        self.log(f"{prefix}/ppl", torch.exp(loss))
        if split in self.bytes_per_token:
            self.log(f"{prefix}/bpb", loss / math.log(2) / self.bytes_per_token[split], prog_bar=prefix == "val")

    on_test_epoch_end = on_validation_epoch_end

    def configure_optimizers(self):
        o = self.optim
        optimizer = torch.optim.AdamW(self.model.optimizer_groups(o["weight_decay"]), lr=o["lr"],
                                      betas=tuple(o["betas"]))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, o["warmup_steps"], o["decay_steps"], o["min_lr"] / o["lr"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
