"""The training pipeline behind ``train.py``: compose, fit, test the best checkpoint, write the result.

Follows the lightning-hydra-template shape: check the config; seed; instantiate the datamodule,
module, callbacks, loggers and trainer from the config; ``fit`` (or resume); ``test`` with the
best checkpoint; return the metrics (so a Hydra sweeper can optimise them) and save them as
``result.json`` in the run folder. Under DDP every rank runs this function; only global rank 0
writes files (:class:`dynpos.training.run_folder.RunRecord`, ``result.json``, the callbacks').
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from dynpos.data.corpora import SPLITS
from dynpos.data.datamodule import TextDataModule
from dynpos.data.tokenizer import tokenizer_fingerprint
from dynpos.evaluation.extrapolate import run_extrapolation
from dynpos.training.callbacks import BiasPlot, TextSample
from dynpos.training.checkpoint import CheckpointError, checkpoint_tokenizer
from dynpos.training.module import LitGPT
from dynpos.training.preflight import preflight, resume_source
from dynpos.training.run_folder import RunRecord, package_versions

console = Console(stderr=False, highlight=False, soft_wrap=True)  # paths stay whole for copy-paste


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as JSON atomically (temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def build_datamodule(cfg: DictConfig, tokenizer_path: str | None = None) -> TextDataModule:
    """The datamodule of a training config (``data``, ``tokenizer``, ``model.block_size``, ``batch_size``)."""
    return TextDataModule(
        corpus=OmegaConf.to_container(cfg.data, resolve=True),
        tokenizer=OmegaConf.to_container(cfg.tokenizer, resolve=True),
        block_size=cfg.model.block_size,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        cache_dir=cfg.paths.cache_dir,
        val_windows=cfg.val_windows,
        max_steps=cfg.trainer.max_steps,
        tokenizer_path=tokenizer_path,
    )


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers); ``None`` entries are skipped."""
    return [instantiate(entry) for entry in (group or {}).values() if entry is not None]


def quiet_known_warnings() -> None:
    """Silence Lightning notices that do not apply to dynpos's step-indexed training stream."""
    for pattern in (".*IterableDataset. has .__len__. defined.*", ".*isinstance.treespec, LeafSpec.*",
                    ".*litlogger.*"):
        warnings.filterwarnings("ignore", message=pattern)


def parameter_digests(trainer: L.Trainer, module: L.LightningModule) -> list[str] | None:
    """A SHA-256 digest (16 hex digits) of each rank's parameters, gathered from all ranks, one
    entry per rank: data-parallel training keeps them equal by construction, and the run records
    that it did. None under strategies that shard the parameters (FSDP): ranks hold different shards.
    """
    if not isinstance(trainer.strategy, (DDPStrategy, SingleDeviceStrategy)):
        return None
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    mine = torch.tensor(int.from_bytes(h.digest()[:8], "little", signed=True), device=module.device)
    gathered = trainer.strategy.all_gather(mine).reshape(-1).tolist()
    return [f"{d & (2**64 - 1):016x}" for d in gathered]


def train(cfg: DictConfig) -> dict:
    """Train, test the best checkpoint and return the final metrics.

    Resumes from ``ckpt_path``, or with ``resume=auto`` from the run folder's ``last.ckpt``
    (:mod:`dynpos.training.preflight`): model, optimizer, LR schedule, loop counters and data
    position continue exactly (the data windows and dropout masks are functions of the step).

    Raises:
        ValueError, FileNotFoundError, FileExistsError: for bad configuration or input, first the
            :func:`~dynpos.training.preflight.preflight` checks (one-line messages that name the
            key and the fix; ``train.py`` prints them without a traceback).
        FloatingPointError: the training loss or the weights became non-finite (the last good
            checkpoint is kept).
    """
    quiet_known_warnings()
    resume, checkpoint = preflight(cfg)
    out = Path(cfg.paths.output_dir)
    if cfg.get("resume") == "auto" and resume is None:
        console.print(f"resume=auto: no checkpoint in {out / 'checkpoints'} yet, starting a new run")
    if cfg.eval.lengths and cfg.eval.split not in SPLITS:
        raise ValueError(f"eval.split={cfg.eval.split!r}: choose one of {', '.join(SPLITS)}")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out.mkdir(parents=True, exist_ok=True)

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if checkpoint is not None:  # the model and scheme were compared in preflight; now the tokenizer
        source = resume_source(cfg, resume)
        theirs = tokenizer_fingerprint(checkpoint_tokenizer(checkpoint, source))
        if theirs != tokenizer_fingerprint(datamodule.tokenizer):
            raise CheckpointError(
                f"{source} was trained with a different tokenizer than tokenizer={cfg.tokenizer.kind} "
                f"on data={cfg.data.name}: resume with the run's own data and tokenizer, or start a new run"
            )
    module = LitGPT(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        pos=OmegaConf.to_container(cfg.pos, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        vocab_size=datamodule.vocab_size,
        bytes_per_token=dict(datamodule.bytes_per_token),
        seed=cfg.seed,
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    n_params = module.model.num_params()
    n_pos = sum(p.numel() for p in module.model.pos.parameters())
    console.print(f"[bold]model[/]: {n_params:,} parameters ({n_params / 1e6:.2f}M), "
                  f"of which pos={module.model.pos.name}: {n_pos:,}")

    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    versions = package_versions()
    resume_step = checkpoint["global_step"] if checkpoint is not None else None
    del checkpoint  # memory-mapped; Lightning reads the file itself
    record = RunRecord(out, cfg, datamodule.tokenizer, versions, loggers=loggers, resume_step=resume_step)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, record], logger=loggers or False)
    if resume:
        console.print(f"[bold]resuming[/] from {resume} at step {resume_step}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    digests = parameter_digests(trainer, module)
    if digests and len(set(digests)) > 1:
        console.print(f"[bold red]warning[/]: the ranks' parameters differ after training: {digests}")

    checkpointer = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    best = checkpointer.best_model_path if checkpointer and checkpointer.best_model_path else None
    metrics = {}
    for evaluate in (trainer.validate, trainer.test):  # both scored with the best checkpoint
        evaluate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.eval.lengths and trainer.is_global_zero:  # scored once, on rank 0
        split = cfg.eval.split
        result_rows = run_extrapolation(
            module.model, datamodule.tokens[split], datamodule.bytes_per_token.get(split), out / "eval",
            **OmegaConf.to_container(cfg.eval, resolve=True),
        )
    else:
        result_rows = None
    sample = next((c.last for c in callbacks if isinstance(c, TextSample)), None)
    plot = next((c.path for c in callbacks if isinstance(c, BiasPlot)), None)
    result = {
        "metrics": metrics,
        "num_params": n_params,
        "pos": module.model.pos.name,
        "best_checkpoint": best,
        "last_checkpoint": checkpointer.last_model_path if checkpointer else None,
        "bias_plot": str(plot) if plot else None,
        "extrapolation": result_rows,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": versions,
        "rank_parameter_digests": digests,
    }
    if trainer.is_global_zero:
        write_json(out / "result.json", result)
        summary = [f"val/loss {metrics.get('val/loss', float('nan')):.4f} nats/token",
                   f"val/bpb {metrics.get('val/bpb', float('nan')):.4f}",
                   f"test/loss {metrics.get('test/loss', float('nan')):.4f}",
                   f"test/bpb {metrics.get('test/bpb', float('nan')):.4f}"]
        console.rule("result")
        console.print(" | ".join(summary))
        if sample:
            console.print(f"[bold]sample[/]:\n{sample}")
        console.print(f"[bold]checkpoint[/]: {best or result['last_checkpoint']}")
        if plot:
            console.print(f"[bold]bias plot[/]: {plot}")
        console.print(f"[bold]result[/]: {out / 'result.json'}")
    return metrics
