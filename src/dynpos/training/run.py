"""The training pipeline behind ``train.py``, in the lightning-hydra-template shape: check the config and the run
folder, instantiate, fit (or continue), score the best checkpoint on the validation and test splits, save
``result.json`` and return the metrics (for a Hydra sweeper). Under DDP every rank runs :func:`train`; only global
rank 0 writes files. The run folder is ``paths.output_dir``: Hydra's ``hydra.run.dir`` (``runs/<date>_<time>_<name>``
unless given), or in a sweep ``hydra.sweep.dir/hydra.sweep.subdir``; resume policy: README, Resuming and scaling out.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
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
from dynpos.training.checkpoint import CheckpointError, load_checkpoint
from dynpos.training.cli import guard
from dynpos.training.module import LitGPT

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
# Keys that may change when a run is continued: they leave the weights' and the data's meaning alone.
FREE_ON_RESUME = {"model": ("dropout", "attn", "compile"), "pos": (), "tokenizer": (),
                  "data": ("batch_size", "val_windows", "num_workers", "eval_batch_size")}
# The litlogger advertisement Lightning logs (not warns) whenever no LitLogger is attached: dropped, once
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())


def build_datamodule(cfg: DictConfig, **overrides) -> L.LightningDataModule:
    """The ``data`` group's datamodule, with the keys that live elsewhere in the config."""
    return instantiate(cfg.data, block_size=cfg.model.block_size, seed=cfg.seed, cache_dir=str(cfg.paths.cache_dir),
                       max_steps=cfg.trainer.get("max_steps"), **overrides)


def check_run_folder(cfg: DictConfig, out: Path, given: bool = True) -> str | None:
    """The checkpoint to continue (``ckpt_path``, or with ``resume=auto`` the run folder ``out``'s ``last.ckpt``
    if it exists; None for a fresh start), once it is sure that the run overwrites nothing in ``out``.

    Raises:
        ValueError: ``resume=auto`` and ``out`` not ``given`` (no ``hydra.run.dir``): it would start a new folder.
        FileExistsError: ``out`` holds a finished run (``result.json``), or the checkpoints of an unfinished run
            that the run does not continue; the message says what to pass instead.
        NotADirectoryError: ``out`` is a file.
    """
    last = out / "checkpoints" / "last.ckpt"  # where the checkpoint callback (save_last) writes
    resume = cfg.get("ckpt_path") or None
    if cfg.get("resume") == "auto":
        if not given:
            raise ValueError("resume=auto needs the run folder to continue: add hydra.run.dir=<run folder> "
                             "(e.g. hydra.run.dir=runs/<date>_<time>_<name>)")
        resume = str(last) if last.is_file() else None
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"hydra.run.dir={out} is a file: give a folder for the run")
    if (out / "result.json").is_file():
        raise FileExistsError(
            f"run folder {out} already holds a finished run (result.json): leave hydra.run.dir out for a new "
            f"timestamped folder or give another one; to train on from it, use ckpt_path={last} "
            "with a new folder"
        )
    existing = sorted(last.parent.glob("*.ckpt"))
    if existing and (resume is None or Path(resume).resolve().parent != last.parent.resolve()):
        raise FileExistsError(
            f"run folder {out} holds checkpoints of an unfinished run ({existing[0].name}): continue it with "
            f"resume=auto hydra.run.dir={out}, or give another hydra.run.dir"
        )
    return resume


def open_run(cfg: DictConfig) -> tuple[str | None, int | None]:
    """:func:`check_run_folder`, then check the checkpoint to continue from: that checkpoint and its global step,
    ``(None, None)`` for a fresh start.

    Raises:
        CheckpointError: a missing, unreadable or unsafe checkpoint, or one whose model, scheme, corpus or
            tokenizer differs from the config's (the keys of :data:`FREE_ON_RESUME` may change).
    """
    resume = check_run_folder(cfg, Path(cfg.paths.output_dir))
    if resume is None:
        return None, None
    key = f"ckpt_path={resume}" if cfg.get("ckpt_path") else f"resume=auto ({resume})"
    checkpoint = load_checkpoint(resume, "ckpt_path" if cfg.get("ckpt_path") else "resume=auto", mmap=True)
    saved = checkpoint["hyper_parameters"]["config"]
    for group, free in FREE_ON_RESUME.items():
        ours, theirs = OmegaConf.to_container(cfg[group], resolve=True), saved.get(group) or {}
        changed = sorted(k for k in set(ours) | set(theirs) if k not in free and ours.get(k) != theirs.get(k))
        if changed:
            raise CheckpointError(
                f"{key} holds a different {group} ({', '.join(f'{group}.{k}' for k in changed)} differ): "
                f"continue with the {group} it was trained with (its run's .hydra/config.yaml), or start a new run"
            )
    return resume, int(checkpoint["global_step"])


class RunFolderGuard(Callback):
    """Hydra callback (``configs/train.yaml``): :func:`check_run_folder` on ``hydra.run.dir``, through
    :func:`~dynpos.training.cli.guard`, before Hydra writes ``.hydra/`` and the log there (:func:`open_run` checks
    again in the job, where sweep folders are known)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # so ${hydra:...} in the default run dir resolves this early
        given = any(o.split("=", 1)[0] in ("hydra.run.dir", "+hydra.run.dir")
                    for o in [*config.hydra.overrides.hydra, *config.hydra.overrides.task])
        guard(lambda: check_run_folder(config, Path(str(config.hydra.run.dir)), given))


def _interrupted(out: Path) -> str:
    """What an interrupted run keeps (the step its ``last.ckpt`` holds) and the command that continues it."""
    last = out / "checkpoints" / "last.ckpt"
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

    record = RunRecord(resume_step, loggers)
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

    # the checkpoint callback's paths, read now: validate(ckpt_path=best) restores its old state
    best, last = (getattr(trainer.checkpoint_callback, p, "") or None for p in ("best_model_path", "last_model_path"))
    metrics = {}
    for evaluate in (trainer.validate, trainer.test):  # both scored with the best checkpoint
        evaluate(module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    if not trainer.is_global_zero:  # global rank 0 scores the lengths and writes the result
        return metrics
    extrapolation = None
    if cfg.eval.lengths:
        extrapolation = run_extrapolation(module.model, datamodule.tokens[cfg.eval.split],
                                          datamodule.bytes_per_token.get(cfg.eval.split), out / "eval",
                                          **OmegaConf.to_container(cfg.eval, resolve=True))
    lengthgen = next((c.rows for c in callbacks if isinstance(c, LengthGenEval)), None)
    sample = next((c.last for c in callbacks if isinstance(c, TextSample)), None)
    plot = next((c.path for c in callbacks if isinstance(c, BiasPlot)), None)
    write_json(out / "result.json", {
        "metrics": metrics,
        "num_params": n_params,
        "pos": module.model.pos.name,
        "best_checkpoint": best,
        "last_checkpoint": last,
        "bias_plot": str(plot) if plot else None,
        "extrapolation": extrapolation,
        "lengthgen": lengthgen,
        "config": config,
        "versions": record.versions,
    })
    console.rule("result")  # the end of the run on the console: losses, sample, where the files are
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
    console.print(f"[bold]checkpoint[/]: {best or last}")
    if plot:
        console.print(f"[bold]bias plot[/]: {plot}")
    console.print(f"[bold]result[/]: {out / 'result.json'}")
    return metrics


def remove_if_empty(out: Path) -> None:
    """Remove a run folder that holds nothing but what Hydra wrote at its start (a refused command)."""
    if out.is_dir() and {p.name for p in out.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(out, ignore_errors=True)


def main(cfg: DictConfig) -> dict:
    """``train.py``'s body: :func:`train` under :func:`~dynpos.training.cli.guard`; a refused command leaves no
    run folder behind."""
    return guard(lambda: train(cfg), on_error=lambda: remove_if_empty(Path(cfg.paths.output_dir)))
