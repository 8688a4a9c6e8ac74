"""What a run records in its run folder, and on which rank.

The run folder (``paths.output_dir``; see :mod:`dynpos.training.preflight` for when a run may
write there) holds ``config.yaml``, ``tokenizer.json``, ``versions.json``,
``checkpoints/{best,last}.ckpt``, the logs, plots, samples and, once the run has finished,
``result.json``.

- :func:`package_versions`: the versions of the packages a result depends on and the git commit.
- :class:`RunRecord`: writes the records on global rank 0 once the strategy has set the ranks, and
  carries a resumed run's CSV log over so ``metrics.csv`` reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer

PACKAGES = ("dynpos", "torch", "lightning", "torchmetrics", "hydra-core", "omegaconf", "datasets", "tokenizers",
            "numpy", "wandb")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10,
                              env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})  # read-only: no index refresh
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def package_versions() -> dict[str, Any]:
    """Python, platform, the versions of :data:`PACKAGES` and dynpos's git commit.

    ``git`` is ``{"commit": sha, "dirty": bool}`` when the ``dynpos`` package runs from a git
    checkout (an editable install), else None. Nothing from the environment is recorded.
    """
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    import torch

    source = Path(__file__).resolve().parents[1]  # src/dynpos
    commit = _git(["rev-parse", "HEAD"], source)
    git = None
    if commit:
        status = _git(["status", "--porcelain", "--untracked-files=no"], source)
        git = {"commit": commit, "dirty": bool(status) if status is not None else None}
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": packages,
            "cuda": torch.version.cuda, "git": git}


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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
    rank 0): ``config.yaml``, ``tokenizer.json``, ``versions.json``, the loggers' hyperparameters,
    and on resume the CSV log of the steps before the checkpoint (:func:`csv_history`), so
    ``metrics.csv`` reads as one uninterrupted run.

    Args:
        out: the run folder.
        config: the resolved run config.
        tokenizer: the datamodule's tokenizer.
        versions: :func:`package_versions`.
        resume_step: the global step of the checkpoint being resumed, or None.
        loggers: the trainer's loggers; on resume their CSV history is read here, before ``fit``.
    """

    def __init__(self, out: Path, config: DictConfig, tokenizer: Tokenizer, versions: dict,
                 resume_step: int | None = None, loggers: list | None = None) -> None:
        self.out, self.config, self.tokenizer, self.versions = Path(out), config, tokenizer, versions
        self.history = {}
        if resume_step is not None:
            self.history = {id(lg): csv_history(lg, resume_step) for lg in loggers or [] if isinstance(lg, CSVLogger)}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.out / "config.yaml", OmegaConf.to_yaml(self.config, resolve=True))
        write_text_atomic(self.out / "tokenizer.json", self.tokenizer.to_str(pretty=True))
        write_text_atomic(self.out / "versions.json", json.dumps(self.versions, indent=2))
        for logger in trainer.loggers:
            if self.history.get(id(logger)):
                for step, metrics in self.history[id(logger)]:
                    logger.experiment.log_metrics(metrics, step)
                logger.save()
            logger.log_hyperparams(OmegaConf.to_container(self.config, resolve=True))
