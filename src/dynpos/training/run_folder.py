"""The run folder and resume policy (README, Resuming and scaling out): where a run writes, what it continues
from, what it records. The run folder is ``paths.output_dir``: Hydra's ``hydra.run.dir`` (``runs/<date>_<time>_<name>``
unless given), or in a sweep ``hydra.sweep.dir/hydra.sweep.subdir``.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib.metadata import distributions
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
_EMPTY_RUN = {".hydra", "train.log"}  # what a run folder refused before training may hold


def last_checkpoint(out: Path) -> Path:
    """Where ``resume=auto`` looks: ``<run folder>/checkpoints/last.ckpt``."""
    return Path(out) / "checkpoints" / "last.ckpt"


def check_run_folder(cfg: DictConfig, out: Path) -> str | None:
    """The checkpoint to continue (``ckpt_path``, or with ``resume=auto`` the run folder ``out``'s ``last.ckpt``
    if it exists; None for a fresh start), once it is sure that the run overwrites nothing in ``out``.

    Raises:
        FileExistsError: ``out`` holds a finished run (``result.json``), or the checkpoints of an unfinished run
            that the run does not continue; the message says what to pass instead.
        NotADirectoryError: ``out`` is a file.
    """
    if cfg.get("resume") == "auto":
        resume = str(last_checkpoint(out)) if last_checkpoint(out).is_file() else None
    else:
        resume = str(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"hydra.run.dir={out} is a file: give a folder for the run")
    if (out / "result.json").is_file():
        raise FileExistsError(
            f"run folder {out} already holds a finished run (result.json): leave hydra.run.dir out for a new "
            f"timestamped folder or give another one; to train on from it, use ckpt_path={last_checkpoint(out)} "
            "with a new folder"
        )
    folder = out / "checkpoints"
    existing = sorted(folder.glob("*.ckpt"))
    if existing and (resume is None or Path(resume).resolve().parent != folder.resolve()):
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


def remove_if_empty(out: Path) -> None:
    """Remove a run folder that holds nothing but what Hydra wrote at its start (a refused command)."""
    if out.is_dir() and {p.name for p in out.iterdir()} <= _EMPTY_RUN:
        shutil.rmtree(out, ignore_errors=True)


class RunFolderGuard(Callback):
    """Hydra callback (``hydra.callbacks`` in ``configs/train.yaml``): :func:`check_run_folder` on
    ``hydra.run.dir`` before Hydra writes ``.hydra/`` and the log there, so a refused command leaves a finished
    run's folder byte for byte as it was; :func:`open_run` checks again in the job (sweep folders are known only
    then). ``resume=auto`` without ``hydra.run.dir`` is refused here: it would quietly start a new folder.
    Refusals go through :func:`dynpos.training.cli.guard`.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # so ${hydra:...} in the default run dir resolves this early

        def check() -> None:
            given = any(o.split("=", 1)[0] in ("hydra.run.dir", "+hydra.run.dir")
                        for o in [*config.hydra.overrides.hydra, *config.hydra.overrides.task])
            if config.get("resume") == "auto" and not given:
                raise ValueError("resume=auto needs the run folder to continue: add hydra.run.dir=<run folder> "
                                 "(e.g. hydra.run.dir=runs/<date>_<time>_<name>)")
            check_run_folder(config, Path(str(config.hydra.run.dir)))

        guard(check)


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=10,
                              check=True, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.strip()  # read-only
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, Any]:
    """Python, platform, CUDA, the versions of :data:`PACKAGES` and, when dynpos runs from a git checkout,
    ``git``: ``{"commit": sha, "dirty": bool}``. Nothing from the environment is recorded."""
    commit = _git("rev-parse", "HEAD")
    git = {"commit": commit, "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))} if commit else None
    packages = {name: next((d.version for d in distributions(name=name)), None) for name in PACKAGES}
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": packages,
            "cuda": torch.version.cuda, "git": git}
