"""The training pipeline behind ``train.py``, in the lightning-hydra-template shape: check the config and the run
folder, instantiate, fit (or continue), score the best checkpoint on the validation and test splits, save
``result.json`` and return the metrics (for a Hydra sweeper). Under DDP every rank runs :func:`train`; only global
rank 0 writes files.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from dynpos.atomic import write_json
from dynpos.config import validate
from dynpos.evaluation.extrapolate import run_extrapolation
from dynpos.evaluation.lengthgen import LengthGenEval
from dynpos.model.attention import choose_attention
from dynpos.training.callbacks import BiasPlot, RunRecord, TextSample
from dynpos.training.cli import guard
from dynpos.training.module import LitGPT
from dynpos.training.run_folder import last_checkpoint, open_run, package_versions, remove_if_empty

console = Console(stderr=False, highlight=False, soft_wrap=True)  # paths stay whole for copy-paste

# Lightning notices that do not apply to dynpos, each with the reason it does not:
QUIET = (
    ".*IterableDataset. has .__len__. defined.*",  # StepStream splits its steps among workers itself
    ".*isinstance.treespec, LeafSpec.*",  # a deprecation inside Lightning's own code
    ".*Previous log files in this directory will be deleted.*",  # on resume, RunRecord writes them back
    # under DDP, val/test sum SumMetric states over ranks, train/loss syncs, train/tokens and train/lr agree
    ".*It is recommended to use .self.log.*sync_dist=True.*",
    # another run's checkpoint (ckpt_path): every run ends with a validation, so its folder gets its own best
    ".*The dirpath has changed from.*",
    ".*Checkpoint directory .* exists and is not empty.*",  # resume=auto continues the folder's own checkpoints
)


def _no_advert(record: logging.LogRecord) -> bool:
    """Drop the litlogger advertisement Lightning logs (not warns) whenever no LitLogger is attached."""
    return "litlogger" not in record.getMessage()


def build_datamodule(cfg: DictConfig, **overrides) -> L.LightningDataModule:
    """The ``data`` group's datamodule, with the keys that live elsewhere in the config."""
    return instantiate(cfg.data, block_size=cfg.model.block_size, seed=cfg.seed, cache_dir=str(cfg.paths.cache_dir),
                       max_steps=cfg.trainer.get("max_steps"), **overrides)


def _interrupted(out: Path) -> str:
    """What an interrupted run keeps (the step its ``last.ckpt`` holds) and the command that continues it."""
    last = last_checkpoint(out)
    if last.is_file():
        step = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"]
        kept = f"{last} holds step {step}, where it continues"
    else:
        kept = "no checkpoint was written yet (the first comes with the first validation), so it starts over"
    args = [a for a in sys.argv[1:] if a.split("=", 1)[0] not in ("resume", "hydra.run.dir", "ckpt_path")]
    command = shlex.join(["python", sys.argv[0], *args, "resume=auto", f"hydra.run.dir={out}"])
    return f"{kept}; continue with:\n{command}"


def train(cfg: DictConfig) -> dict:
    """Train (or continue exactly from ``ckpt_path`` or, with ``resume=auto``, the run folder's ``last.ckpt``),
    score the best checkpoint and return the final metrics.

    Raises:
        ValueError, FileNotFoundError, FileExistsError: bad configuration or input, before any data is read
            (one-line messages that name the key and the fix).
        FloatingPointError: the training loss or the weights became non-finite (the last good checkpoint is kept).
    """
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_advert)  # a filter is added once
    validate(cfg)
    if cfg.trainer.get("accelerator") == "gpu" and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator=gpu (trainer={cfg.trainer.get('strategy') or 'gpu'}) needs a CUDA GPU "
                         "and none is visible: use trainer=cpu (or trainer=ddp for several CPU processes)")
    if cfg.model.attn == "flex":  # refused before any data where it cannot train (flex has no CPU backward)
        on_gpu = cfg.trainer.get("accelerator") in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        choose_attention("flex", bias="table", learned=True, device="cuda" if on_gpu else "cpu", grad=True,
                         cached=False, dropout=0.0, length=cfg.model.block_size)
    out = Path(cfg.paths.output_dir)
    resume, resume_step = open_run(cfg)
    if cfg.get("resume") == "auto" and resume is None:
        console.print(f"resume=auto: no checkpoint in {out / 'checkpoints'} yet, starting a new run")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg)
    if cfg.eval.lengths and not hasattr(datamodule, "tokens"):
        raise ValueError(f"eval.lengths scores text at longer lengths; data={datamodule.__class__.__name__} is a task "
                         "scored by its own eval_lengths: drop eval.lengths (eval.lengths=null)")
    callbacks, loggers = ([instantiate(c) for c in (cfg.get(group) or {}).values() if c is not None]
                          for group in ("callbacks", "logger"))
    out.mkdir(parents=True, exist_ok=True)
    datamodule.prepare_data()
    datamodule.setup("fit")
    config = OmegaConf.to_container(cfg, resolve=True)
    module = LitGPT(config, vocab_size=datamodule.vocab_size, bytes_per_token=dict(datamodule.bytes_per_token))
    n_params = module.model.num_params()
    console.print(f"[bold]model[/]: {n_params:,} parameters ({n_params / 1e6:.2f}M), of which "
                  f"pos={module.model.pos.name}: {sum(p.numel() for p in module.model.pos.parameters()):,}")

    versions = package_versions()
    record = RunRecord(versions, resume_step, loggers)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, record], logger=loggers or False)
    if resume:
        console.print(f"[bold]resuming[/] from {resume} at step {resume_step}")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except SystemExit as stop:  # Ctrl-C: Lightning exits 1; SIGTERM: its SIGTERMException, which would exit 0
        if trainer.interrupted and trainer.is_global_zero:
            console.print(f"[bold]interrupted[/] at step {trainer.global_step}; {_interrupted(out)}")
        if isinstance(stop, SIGTERMException):
            raise SystemExit(128 + signal.SIGTERM) from None  # the shell's status for a run ended by SIGTERM
        raise

    checkpointer = trainer.checkpoint_callback  # its paths read now: validate(ckpt_path=best) restores its old state
    best = checkpointer.best_model_path if checkpointer and checkpointer.best_model_path else None
    last = checkpointer.last_model_path if checkpointer and checkpointer.last_model_path else None
    metrics = {}
    for evaluate in (trainer.validate, trainer.test):  # both scored with the best checkpoint
        evaluate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    extrapolation = None
    if cfg.eval.lengths and trainer.is_global_zero:  # scored once, on rank 0
        extrapolation = run_extrapolation(module.model, datamodule.tokens[cfg.eval.split],
                                          datamodule.bytes_per_token.get(cfg.eval.split), out / "eval",
                                          **OmegaConf.to_container(cfg.eval, resolve=True))
    lengthgen = next((c.rows for c in callbacks if isinstance(c, LengthGenEval)), None)
    sample = next((c.last for c in callbacks if isinstance(c, TextSample)), None)
    plot = next((c.path for c in callbacks if isinstance(c, BiasPlot)), None)
    result = {
        "metrics": metrics,
        "num_params": n_params,
        "pos": module.model.pos.name,
        "best_checkpoint": best,
        "last_checkpoint": last,
        "bias_plot": str(plot) if plot else None,
        "extrapolation": extrapolation,
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
    metrics, extrapolation, lengthgen = result["metrics"], result["extrapolation"], result["lengthgen"]
    console.rule("result")
    console.print(" | ".join(f"{k} {metrics[k]:.4f}" + (" nats/token" if k.endswith("loss") else "")
                             for k in ("val/loss", "val/bpb", "test/loss", "test/bpb") if k in metrics))
    if extrapolation:
        losses = (f"{r['length']} ({r['protocol']}) {r['loss']:.4f}" for r in extrapolation if r["loss"] is not None)
        console.print(f"[bold]loss against evaluation length[/]: {', '.join(losses)}")
        console.print(f"[bold]extrapolation[/]: {out / 'eval' / 'extrapolation.csv'}, "
                      f"{out / 'eval' / 'extrapolation.png'}")
    if lengthgen:
        matches = (f"{r['length']} {'n/a' if r['exact_match'] is None else format(r['exact_match'], '.2f')}"
                   for r in lengthgen)
        console.print(f"[bold]exact match by length[/]: {', '.join(matches)}")
        console.print(f"[bold]length generalization[/]: {out / 'lengthgen'}")
    if sample:
        console.print(f"[bold]sample[/]:\n{sample}")
    console.print(f"[bold]checkpoint[/]: {result['best_checkpoint'] or result['last_checkpoint']}")
    if result["bias_plot"]:
        console.print(f"[bold]bias plot[/]: {result['bias_plot']}")
    console.print(f"[bold]result[/]: {out / 'result.json'}")


def main(cfg: DictConfig) -> dict:
    """``train.py``'s body: :func:`train` under :func:`~dynpos.training.cli.guard`; a refused command leaves no
    run folder behind."""
    return guard(lambda: train(cfg), on_error=lambda: remove_if_empty(Path(cfg.paths.output_dir)))
