"""Checks that run before a training run reads any data, so a bad command fails in seconds.

``train.py`` calls :func:`preflight` before it even imports Lightning; :func:`dynpos.training.run.train`
calls it again for programmatic callers. It checks the run-level config keys (types and ranges,
naming the key and the fix), resolves what to resume from and refuses run folders whose contents
the run would overwrite. Data paths, checkpoints and tokenizers are checked where they are read.

The run folder is ``paths.output_dir``, i.e. Hydra's ``hydra.run.dir`` (``runs/<date>_<time>_<name>``
unless given) or in a sweep ``hydra.sweep.dir/hydra.sweep.subdir``. ``resume=auto`` continues its
``checkpoints/last.ckpt`` when that exists and starts fresh when it does not, so a job script (a
SLURM requeue, a preempted job) can always pass it together with an explicit ``hydra.run.dir``.
A finished run (``result.json``) is never written again: :class:`RunFolderGuard`, a Hydra callback
(``hydra.callbacks`` in ``configs/train.yaml``), refuses such a ``hydra.run.dir`` before Hydra itself
writes its ``.hydra/`` record and log there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

RESUME_CHOICES = (None, "auto")


def _is_number(value: Any, integer: bool = False) -> bool:
    kinds = (int,) if integer else (int, float)
    return isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)


def _whole(key: str, value: Any, minimum: int) -> None:
    if not _is_number(value, integer=True) or value < minimum:
        raise ValueError(f"{key}={value!r}: give a whole number >= {minimum}")


def check_optim(optim: Mapping[str, Any]) -> None:
    """Validate the ``optim`` config group (see ``configs/train.yaml``).

    Raises:
        ValueError: a missing key, a value of the wrong type or out of range; the message names
            the ``optim.<key>`` and what to give instead.
    """
    for key in ("lr", "min_lr", "weight_decay", "warmup_steps", "decay_steps", "betas"):
        if key not in optim:
            raise ValueError(f"optim.{key} is missing: set it (configs/train.yaml has the defaults)")
    for key in ("lr", "min_lr", "weight_decay", "warmup_steps", "decay_steps"):
        integer = key.endswith("_steps")
        if not _is_number(optim[key], integer):
            raise ValueError(f"optim.{key}={optim[key]!r}: give a {'whole number of steps' if integer else 'number'}")
        if optim[key] < 0:
            raise ValueError(f"optim.{key} must be >= 0, got {optim[key]}")
    if not optim["lr"] > 0:
        raise ValueError(f"optim.lr must be > 0, got {optim['lr']} (a peak learning rate such as 1e-3)")
    betas = optim["betas"]
    if not (isinstance(betas, Sequence) and not isinstance(betas, str) and len(betas) == 2
            and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"optim.betas={betas!r}: give two numbers in [0, 1), e.g. optim.betas=[0.9,0.99]")


def check_eval(eval_cfg: Mapping[str, Any]) -> None:
    """Validate the ``eval`` group when ``eval.lengths`` is set (the split is checked against the corpus later).

    Raises:
        ValueError: naming the ``eval.<key>`` and the fix.
    """
    lengths = eval_cfg.get("lengths")
    if lengths is None:
        return
    if not isinstance(lengths, Sequence) or isinstance(lengths, str) or not lengths:
        raise ValueError(f"eval.lengths={lengths!r}: give a list of token counts, e.g. eval.lengths=[128,256]")
    if not all(_is_number(n, integer=True) and n >= 1 for n in lengths):
        raise ValueError(f"eval.lengths={list(lengths)}: give positive token counts, e.g. eval.lengths=[128,256]")
    from dynpos.evaluation.extrapolate import PROTOCOLS, window_plan

    protocol, stride = eval_cfg.get("protocol"), eval_cfg.get("stride")
    if stride is not None:
        _whole("eval.stride", stride, 1)
    for name in PROTOCOLS if protocol == "both" else (protocol,):
        for length in lengths:
            window_plan(0, length, name, stride)  # its checks of protocol and stride, naming the eval.<key>
    _whole("eval.batch_size", eval_cfg.get("batch_size"), 1)
    _whole("eval.max_tokens", eval_cfg.get("max_tokens"), 1)


def check_config(cfg: DictConfig) -> None:
    """Check the run-level keys: ``seed``, ``batch_size``, ``val_windows``, ``trainer.max_steps``,
    the ``model`` sizes (``GPTConfig``'s own checks), ``optim`` and ``eval``.

    Raises:
        ValueError: a value of the wrong type or out of range; the message names the key and the fix.
    """
    from dynpos.model.gpt import GPTConfig

    _whole("seed", cfg.seed, 0)
    _whole("batch_size", cfg.batch_size, 1)
    if cfg.get("val_windows") is not None:
        _whole("val_windows", cfg.val_windows, 1)
    _whole("trainer.max_steps", cfg.trainer.get("max_steps"), 1)
    GPTConfig(vocab_size=1, **OmegaConf.to_container(cfg.model, resolve=True))  # raises naming model.<key>
    check_optim(OmegaConf.to_container(cfg.optim, resolve=True))
    check_eval(OmegaConf.to_container(cfg.eval, resolve=True))


def last_checkpoint(out: Path) -> Path:
    """Where ``resume=auto`` looks: ``<run folder>/checkpoints/last.ckpt``."""
    return Path(out) / "checkpoints" / "last.ckpt"


def resolve_resume(cfg: DictConfig, out: Path) -> str | None:
    """The checkpoint a run continues from, or None for a fresh start.

    ``ckpt_path=<file>`` names it; ``resume=auto`` takes ``<run folder>/checkpoints/last.ckpt`` if
    it exists, else None.

    Raises:
        ValueError: ``resume`` other than null or auto, or both ``resume=auto`` and ``ckpt_path``.
    """
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    if resume not in RESUME_CHOICES:
        raise ValueError(f"resume={resume!r}: use resume=auto (continue <run folder>/checkpoints/last.ckpt) "
                         "or ckpt_path=<file.ckpt>")
    if resume == "auto" and ckpt_path:
        raise ValueError(f"resume=auto and ckpt_path={ckpt_path} both given: pass one of them")
    if resume == "auto":
        last = last_checkpoint(out)
        return str(last) if last.is_file() else None
    return str(ckpt_path) if ckpt_path else None


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
            "resume=auto, or give another hydra.run.dir"
        )


def resume_source(cfg: DictConfig, resume: str) -> str:
    """How the resumed checkpoint was named, for messages: ``ckpt_path=<file>`` or ``resume=auto (<file>)``."""
    return f"ckpt_path={resume}" if cfg.get("ckpt_path") else f"resume=auto ({resume})"


def check_resumable(checkpoint: Mapping[str, Any], cfg: DictConfig, source: str) -> None:
    """Refuse a checkpoint whose model size or positional scheme differs from the config's
    (``model.dropout`` and ``model.attn`` may change: they leave the weights' meaning). The
    tokenizer is compared once the data is loaded (:func:`dynpos.training.run.train`).

    Raises:
        CheckpointError: naming the keys that differ and what to do instead.
    """
    from dynpos.training.checkpoint import CheckpointError

    hp = checkpoint["hyper_parameters"]
    for group, free in (("model", ("dropout", "attn")), ("pos", ())):
        ours, saved = OmegaConf.to_container(cfg[group], resolve=True), hp.get(group) or {}
        changed = sorted(k for k in set(ours) | set(saved) if k not in free and ours.get(k) != saved.get(k))
        if changed:
            raise CheckpointError(
                f"{source} holds a different {group} ({', '.join(f'{group}.{k}' for k in changed)} differ): "
                f"resume with the {group} it was trained with (its run's config.yaml), or start a new run"
            )


def preflight(cfg: DictConfig) -> tuple[str | None, dict | None]:
    """:func:`check_config`, :func:`resolve_resume`, :func:`check_run_folder`, then read the
    checkpoint to resume from (memory-mapped: cheap) and :func:`check_resumable`.

    Returns:
        ``(path, checkpoint)`` of the checkpoint to resume from; ``(None, None)`` for a fresh start.
        The checkpoint's tensors are memory-mapped from the file.

    Raises:
        ValueError, FileExistsError, NotADirectoryError: as those functions; CheckpointError
            (a ValueError) for a missing, unreadable, unsafe or incompatible checkpoint.
    """
    from dynpos.training.checkpoint import load_checkpoint

    check_config(cfg)
    out = Path(cfg.paths.output_dir)
    resume = resolve_resume(cfg, out)
    check_run_folder(out, resume)
    if resume is None:
        return None, None
    key = "ckpt_path" if cfg.get("ckpt_path") else "resume=auto"
    checkpoint = load_checkpoint(resume, key, mmap=True)
    check_resumable(checkpoint, cfg, resume_source(cfg, resume))
    return resume, checkpoint


class RunFolderGuard(Callback):
    """Hydra callback: check ``hydra.run.dir`` with :func:`check_run_folder` before Hydra creates it
    and writes ``.hydra/`` and the log into it, so a refused command leaves a finished run's
    folder byte for byte as it was (``scripts/report.py`` reads ``.hydra/overrides.yaml``).

    A refusal prints one ``error:`` line and exits with status 2 (:func:`dynpos.training.cli.guard`).
    In a sweep the job folders are checked by :func:`preflight`, after Hydra has set them up.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        from dynpos.training.cli import guard

        HydraConfig.instance().set_config(config)  # so ${hydra:...} in the default run dir resolves this early

        def check() -> None:
            out = Path(str(config.hydra.run.dir))
            check_run_folder(out, resolve_resume(config, out))

        guard(check)
