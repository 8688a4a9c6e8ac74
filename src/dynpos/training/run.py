"""The training pipeline behind ``train.py``: compose, fit, test the best checkpoint, write the result.

Follows the lightning-hydra-template shape: seed; instantiate the datamodule, module, callbacks,
loggers and trainer from the config; ``fit``; ``test`` with the best checkpoint; return the
metrics (so a Hydra sweeper can optimise them) and save them as ``result.json`` in the run folder.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from dynpos.data.datamodule import TextDataModule
from dynpos.data.tokenizer import tokenizer_fingerprint
from dynpos.evaluation.extrapolate import run_extrapolation
from dynpos.training.callbacks import BiasPlot, TextSample
from dynpos.training.checkpoint import CheckpointError, load_checkpoint
from dynpos.training.module import LitGPT

console = Console(stderr=False, highlight=False)


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


def train(cfg: DictConfig) -> dict:
    """Train, test the best checkpoint and return the final metrics.

    Raises:
        ValueError, FileNotFoundError: for bad configuration or input (one-line messages that name
            the key and the fix; ``train.py`` prints them without a traceback).
    """
    quiet_known_warnings()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = cfg.get("ckpt_path")
    checkpoint = load_checkpoint(resume, "ckpt_path") if resume else None

    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if checkpoint is not None:
        theirs = tokenizer_fingerprint(TextDataModule.tokenizer_from_checkpoint(checkpoint))
        if theirs != tokenizer_fingerprint(datamodule.tokenizer):
            raise CheckpointError(
                f"ckpt_path={resume} was trained with a different tokenizer than tokenizer={cfg.tokenizer.kind} "
                f"on data={cfg.data.name}: resume with the run's own data and tokenizer, or start a new run"
            )
    module = LitGPT(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        pos=OmegaConf.to_container(cfg.pos, resolve=True),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        vocab_size=datamodule.vocab_size,
        bytes_per_token=dict(datamodule.bytes_per_token),
    )
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    n_params = module.model.num_params()
    n_pos = sum(p.numel() for p in module.model.pos.parameters())
    console.print(f"[bold]model[/]: {n_params:,} parameters ({n_params / 1e6:.2f}M), "
                  f"of which pos={module.model.pos.name}: {n_pos:,}")

    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    if trainer.is_global_zero:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True), encoding="utf-8")
        datamodule.tokenizer.save(str(out / "tokenizer.json"))
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)

    checkpointer = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    best = checkpointer.best_model_path if checkpointer and checkpointer.best_model_path else None
    metrics = {}
    for evaluate in (trainer.validate, trainer.test):  # both scored with the best checkpoint
        evaluate(module, datamodule=datamodule, ckpt_path=best, verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if cfg.eval.lengths:
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
