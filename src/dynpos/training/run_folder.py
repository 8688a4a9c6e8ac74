"""The run folder and resume policy: where a run writes, what it continues from, what it records.

The run folder is ``paths.output_dir``, i.e. Hydra's ``hydra.run.dir`` (``runs/<date>_<time>_<name>``
unless given) or in a sweep ``hydra.sweep.dir/hydra.sweep.subdir``. It holds Hydra's ``.hydra/``
record, ``tokenizer.json``, ``versions.json``, ``wandb_id`` (with logger=wandb),
``checkpoints/{best,last}.ckpt``, the logs, plots, samples and, once the run has finished,
``result.json``.

- A finished run (``result.json``) is never written again, and an unfinished run's checkpoints
  only by ``resume=auto``: :class:`RunFolderGuard`, a Hydra callback (``hydra.callbacks`` in
  ``configs/train.yaml``), checks ``hydra.run.dir`` before Hydra writes its ``.hydra/`` record
  there; :func:`open_run` checks again in the job (sweep folders are known only then).
- ``resume=auto`` continues ``<run folder>/checkpoints/last.ckpt``, so a job script (a SLURM
  requeue, a preempted job) can always pass it together with an explicit ``hydra.run.dir``.
- A resumed checkpoint must come from the same model, scheme, corpus and tokenizer
  (:func:`check_resumable`, before any data is read).
- A command refused before training leaves no folder behind (:func:`remove_if_empty`).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dynpos.training.checkpoint import CheckpointError, load_checkpoint
from dynpos.training.cli import guard

PACKAGES = ("dynpos", "torch", "lightning", "torchmetrics", "hydra-core", "omegaconf", "datasets", "tokenizers",
            "numpy", "pandas", "wandb")
# Keys that may change when a run is continued: they leave the weights' and the data's meaning alone.
FREE_ON_RESUME = {"model": ("dropout", "attn", "compile"), "pos": (), "tokenizer": (),
                  "data": ("batch_size", "val_windows", "num_workers", "eval_batch_size")}
# What a run folder refused before training may hold; anything else means it is not empty.
_EMPTY_RUN = {".hydra", "train.log"}


def last_checkpoint(out: Path) -> Path:
    """Where ``resume=auto`` looks: ``<run folder>/checkpoints/last.ckpt``."""
    return Path(out) / "checkpoints" / "last.ckpt"


def resolve_resume(cfg: DictConfig, out: Path) -> str | None:
    """The checkpoint a run continues from: ``ckpt_path``, or with ``resume=auto`` the run folder's
    ``last.ckpt`` if it exists; None for a fresh start. (The two keys are checked in
    ``dynpos.config.TrainConfig``.)"""
    if cfg.get("resume") == "auto":
        last = last_checkpoint(out)
        return str(last) if last.is_file() else None
    return str(cfg.ckpt_path) if cfg.get("ckpt_path") else None


def check_run_folder(out: Path, resume: str | None) -> None:
    """Refuse to write into a run folder whose contents the run would overwrite.

    Raises:
        FileExistsError: ``out`` holds a finished run (``result.json``), or the checkpoints of an
            unfinished run that ``resume`` does not continue; the message says what to pass instead.
        NotADirectoryError: ``out`` exists and is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"hydra.run.dir={out} is a file: give a folder for the run")
    if (out / "result.json").is_file():
        raise FileExistsError(
            f"run folder {out} already holds a finished run (result.json): leave hydra.run.dir out for a new "
            f"timestamped folder or give another one; to train on from it, use ckpt_path={last_checkpoint(out)} "
            "with a new folder"
        )
    folder = out / "checkpoints"
    existing = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    resuming_here = resume is not None and Path(resume).resolve().parent == folder.resolve()
    if existing and not resuming_here:
        raise FileExistsError(
            f"run folder {out} holds checkpoints of an unfinished run ({existing[0].name}): continue it with "
            f"resume=auto hydra.run.dir={out}, or give another hydra.run.dir"
        )


def check_resumable(checkpoint: dict, cfg: DictConfig, source: str) -> None:
    """Refuse a checkpoint whose model, scheme, corpus or tokenizer differs from the config's
    (the keys of :data:`FREE_ON_RESUME` may change).

    Raises:
        CheckpointError: naming the keys that differ and what to do instead.
    """
    saved = checkpoint["hyper_parameters"]["config"]
    for group, free in FREE_ON_RESUME.items():
        ours, theirs = OmegaConf.to_container(cfg[group], resolve=True), saved.get(group) or {}
        changed = sorted(k for k in set(ours) | set(theirs) if k not in free and ours.get(k) != theirs.get(k))
        if changed:
            raise CheckpointError(
                f"{source} holds a different {group} ({', '.join(f'{group}.{k}' for k in changed)} differ): "
                f"continue with the {group} it was trained with (its run's .hydra/config.yaml), or start a new run"
            )


@dataclass
class RunStart:
    """What :func:`open_run` found: the run folder, the checkpoint to continue (None: fresh) and
    that checkpoint's global step."""

    out: Path
    resume: str | None = None
    resume_step: int | None = None


def open_run(cfg: DictConfig) -> RunStart:
    """Check the run folder, then open the checkpoint to continue from once (memory-mapped) and
    :func:`check_resumable` it.

    Raises:
        ValueError: ``resume=auto`` without ``hydra.run.dir`` (it would start a new folder).
        FileExistsError, NotADirectoryError: as :func:`check_run_folder`.
        CheckpointError: a missing, unreadable, unsafe or incompatible checkpoint.
    """
    out = Path(cfg.paths.output_dir)
    resume = resolve_resume(cfg, out)
    check_run_folder(out, resume)
    if resume is None:
        return RunStart(out)
    key = f"ckpt_path={resume}" if cfg.get("ckpt_path") else f"resume=auto ({resume})"
    checkpoint = load_checkpoint(resume, "ckpt_path" if cfg.get("ckpt_path") else "resume=auto", mmap=True)
    check_resumable(checkpoint, cfg, key)
    return RunStart(out, resume, int(checkpoint["global_step"]))


def remove_if_empty(out: Path) -> None:
    """Remove a run folder that holds nothing but what Hydra wrote at its start (a refused command)."""
    out = Path(out)
    if out.is_dir() and {p.name for p in out.iterdir()} <= _EMPTY_RUN:
        shutil.rmtree(out, ignore_errors=True)


class RunFolderGuard(Callback):
    """Hydra callback: check ``hydra.run.dir`` with :func:`check_run_folder` before Hydra creates it
    and writes ``.hydra/`` and the log into it, so a refused command leaves a finished run's
    folder byte for byte as it was. ``resume=auto`` without ``hydra.run.dir`` is refused here too:
    it would quietly start a new timestamped folder.

    A refusal prints one ``error:`` line and exits with status 2 (:func:`dynpos.training.cli.guard`).
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # so ${hydra:...} in the default run dir resolves this early

        def check() -> None:
            given = any(o.split("=", 1)[0] in ("hydra.run.dir", "+hydra.run.dir")
                        for o in [*config.hydra.overrides.hydra, *config.hydra.overrides.task])
            if config.get("resume") == "auto" and not given:
                raise ValueError("resume=auto needs the run folder to continue: add hydra.run.dir=<run folder> "
                                 "(e.g. hydra.run.dir=runs/<date>_<time>_<name>)")
            out = Path(str(config.hydra.run.dir))
            check_run_folder(out, resolve_resume(config, out))

        guard(check)


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

    source = Path(__file__).resolve().parents[1]  # src/dynpos
    commit = _git(["rev-parse", "HEAD"], source)
    git = None
    if commit:
        status = _git(["status", "--porcelain", "--untracked-files=no"], source)
        git = {"commit": commit, "dirty": bool(status) if status is not None else None}
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": packages,
            "cuda": torch.version.cuda, "git": git}
