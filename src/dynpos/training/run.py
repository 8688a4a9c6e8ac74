"""The training pipeline behind ``train.py``: instantiate, fit, validate/test the best checkpoint, write.

Follows the lightning-hydra-template shape. :func:`train` checks the config once
(:func:`dynpos.config.validate`: every range, before any data is read) and the run folder
(:func:`dynpos.training.run_folder.open_run`); instantiates the datamodule, module, callbacks,
loggers and trainer from the config; ``fit`` (or continue); scores the best checkpoint on the
validation and test splits; returns the metrics (so a Hydra sweeper can optimise them) and saves
them as ``result.json`` in the run folder. Under DDP every rank runs this function; only global
rank 0 writes files.
"""

from __future__ import annotations

import logging
import shlex
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from dynpos.atomic import write_json
from dynpos.config import validate
from dynpos.evaluation.extrapolate import run_extrapolation
from dynpos.evaluation.lengthgen import LengthGenEval
from dynpos.training.callbacks import BiasPlot, RunRecord, TextSample, ValidateAtEnd
from dynpos.training.cli import guard
from dynpos.training.module import LitGPT
from dynpos.training.run_folder import RunStart, last_checkpoint, open_run, package_versions, remove_if_empty

console = Console(stderr=False, highlight=False, soft_wrap=True)  # paths stay whole for copy-paste


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict-of-configs group (callbacks, loggers); ``None`` entries are skipped."""
    return [instantiate(entry) for entry in (group or {}).values() if entry is not None]


# Lightning notices that do not apply to dynpos, each with the reason it does not:
QUIET = (
    ".*IterableDataset. has .__len__. defined.*",  # StepStream splits its steps among workers itself
    ".*isinstance.treespec, LeafSpec.*",  # a deprecation inside Lightning's own code
    # on resume: RunRecord writes the earlier steps back, so the CSV log is continued, not lost
    ".*Previous log files in this directory will be deleted.*",
    # under DDP: val/test come from SumMetric states summed across ranks; train/tokens and train/lr
    # are the same number on every rank; train/loss is logged with sync_dist
    ".*It is recommended to use .self.log.*sync_dist=True.*",
    # continuing from another run's checkpoint: its best score belongs to the old folder, and every
    # run ends with a validation (ValidateAtEnd), so the new folder gets its own best checkpoint
    ".*The dirpath has changed from.*",
    # resume=auto continues the run folder's own checkpoints on purpose
    ".*Checkpoint directory .* exists and is not empty.*",
)


def quiet_known_warnings() -> None:
    """Silence the Lightning notices of :data:`QUIET` (each says why it does not apply)."""
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_advert)  # a filter is added once


def _no_advert(record: logging.LogRecord) -> bool:
    """Drop the litlogger advertisement Lightning logs (not warns) whenever no LitLogger is attached."""
    return "litlogger" not in record.getMessage()


def build_datamodule(cfg: DictConfig, **overrides) -> L.LightningDataModule:
    """The ``data`` group's datamodule, with the keys that live elsewhere in the config."""
    return instantiate(cfg.data, block_size=cfg.model.block_size, seed=cfg.seed, cache_dir=str(cfg.paths.cache_dir),
                       max_steps=cfg.trainer.get("max_steps"), **overrides)


def continue_command(out: Path) -> str:
    """The command that continues an interrupted run in ``out``: this command plus ``resume=auto``."""
    args = [a for a in sys.argv[1:] if a.split("=", 1)[0] not in ("resume", "hydra.run.dir", "ckpt_path")]
    return shlex.join(["python", sys.argv[0], *args, "resume=auto", f"hydra.run.dir={out}"])


def saved_progress(out: Path) -> str:
    """What an interrupted run keeps: the step its ``last.ckpt`` holds, or that there is none yet."""
    last = last_checkpoint(out)
    if not last.is_file():
        return "no checkpoint was written yet (the first comes with the first validation), so it starts over"
    step = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"]
    return f"{last} holds step {step}, where it continues"


def train(cfg: DictConfig) -> dict:
    """Train, score the best checkpoint and return the final metrics.

    Continues from ``ckpt_path``, or with ``resume=auto`` from the run folder's ``last.ckpt``:
    model, optimizer, LR schedule, loop counters and data position continue exactly (the data
    windows and dropout masks are functions of the step).

    Raises:
        ValueError, FileNotFoundError, FileExistsError: for bad configuration or input, before any
            data is read (one-line messages that name the key and the fix).
        FloatingPointError: the training loss or the weights became non-finite (the last good
            checkpoint is kept).
    """
    quiet_known_warnings()
    validate(cfg)
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator=gpu (trainer={cfg.trainer.get('strategy') or 'gpu'}) needs a CUDA GPU "
                         "and none is visible: "
                         "use trainer=cpu (or trainer=ddp for several CPU processes)")
    start: RunStart = open_run(cfg)
    out = start.out
    if cfg.get("resume") == "auto" and start.resume is None:
        console.print(f"resume=auto: no checkpoint in {out / 'checkpoints'} yet, starting a new run")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    if cfg.eval.lengths and not hasattr(datamodule, "tokens"):
        raise ValueError(f"eval.lengths scores text at longer lengths; data={datamodule.__class__.__name__} is a task "
                         "scored by its own eval_lengths: drop eval.lengths (eval.lengths=null)")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    out.mkdir(parents=True, exist_ok=True)
    datamodule.prepare_data()
    datamodule.setup("fit")
    config = OmegaConf.to_container(cfg, resolve=True)
    module = LitGPT(config, vocab_size=datamodule.vocab_size, bytes_per_token=dict(datamodule.bytes_per_token))
    n_params = module.model.num_params()
    n_pos = sum(p.numel() for p in module.model.pos.parameters())
    console.print(f"[bold]model[/]: {n_params:,} parameters ({n_params / 1e6:.2f}M), "
                  f"of which pos={module.model.pos.name}: {n_pos:,}")

    versions = package_versions()
    record = RunRecord(out, datamodule.tokenizer, versions, loggers=loggers, resume_step=start.resume_step)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, ValidateAtEnd(), record],
                                     logger=loggers or False)
    if start.resume:
        console.print(f"[bold]resuming[/] from {start.resume} at step {start.resume_step}")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=start.resume, weights_only=True)
    except SystemExit:  # Lightning's graceful Ctrl-C ends with exit status 1
        if trainer.interrupted and trainer.is_global_zero:
            console.print(f"[bold]interrupted[/] at step {trainer.global_step}; {saved_progress(out)}; "
                          f"continue with:\n{continue_command(out)}")
        raise

    checkpointer = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    best = checkpointer.best_model_path if checkpointer and checkpointer.best_model_path else None
    metrics = {}
    for evaluate in (trainer.validate, trainer.test):  # both scored with the best checkpoint
        evaluate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    result_rows = None
    if cfg.eval.lengths and trainer.is_global_zero:  # scored once, on rank 0
        split = cfg.eval.split
        result_rows = run_extrapolation(
            module.model, datamodule.tokens[split], datamodule.bytes_per_token.get(split), out / "eval",
            **OmegaConf.to_container(cfg.eval, resolve=True),
        )
    lengthgen = next((c.rows for c in callbacks if isinstance(c, LengthGenEval)), None)
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
        "lengthgen": lengthgen,
        "config": config,
        "versions": versions,
    }
    if trainer.is_global_zero:
        write_json(out / "result.json", result)
        print_result(result, sample, out)
    return metrics


def print_result(result: dict, sample: str | None, out: Path) -> None:
    """The end of a run on the console: losses, sample, where the files are."""
    metrics = result["metrics"]
    console.rule("result")
    console.print(" | ".join(f"{k} {metrics[k]:.4f}" + (" nats/token" if k.endswith("loss") else "")
                             for k in ("val/loss", "val/bpb", "test/loss", "test/bpb") if k in metrics))
    if result["extrapolation"]:
        console.print("[bold]loss against evaluation length[/]: " + ", ".join(
            f"{r['length']} ({r['protocol']}) {r['loss']:.4f}" for r in result["extrapolation"] if r["loss"] is not None))
        console.print(f"[bold]extrapolation[/]: {out / 'eval' / 'extrapolation.csv'}, {out / 'eval' / 'extrapolation.png'}")
    if result["lengthgen"]:
        console.print("[bold]exact match by length[/]: " + ", ".join(
            f"{r['length']} {'n/a' if r['exact_match'] is None else format(r['exact_match'], '.2f')}"
            for r in result["lengthgen"]))
        console.print(f"[bold]length generalization[/]: {out / 'lengthgen'}")
    if sample:
        console.print(f"[bold]sample[/]:\n{sample}")
    console.print(f"[bold]checkpoint[/]: {result['best_checkpoint'] or result['last_checkpoint']}")
    if result["bias_plot"]:
        console.print(f"[bold]bias plot[/]: {result['bias_plot']}")
    console.print(f"[bold]result[/]: {out / 'result.json'}")


def main(cfg: DictConfig) -> dict:
    """``train.py``'s body: :func:`train` under :func:`~dynpos.training.cli.guard`; a refused
    command leaves no run folder behind."""
    return guard(lambda: train(cfg), on_error=lambda: remove_if_empty(Path(cfg.paths.output_dir)))
