"""Lightning ``CheckpointIO`` that writes checkpoints atomically and reads them safely.

Wired into every trainer config (``configs/trainer/cpu.yaml``, ``plugins:``), so each checkpoint
the ``Trainer`` saves (``ModelCheckpoint``'s ``best.ckpt`` and ``last.ckpt``) and each one it
restores (``trainer.fit(ckpt_path=...)``, ``trainer.test(ckpt_path="best")``) goes through it:

- save: serialise into a hidden temporary file in the target's folder, flush and ``fsync`` it,
  then ``os.replace`` it over the target (atomic on POSIX and Windows) and ``fsync`` the folder.
  A process killed at any moment leaves either the previous checkpoint or the new one, never a
  torn file; at worst a stale ``.<name>.tmp-<pid>`` file, which the next save of that name removes once
  process ``pid`` is gone.
- load: :func:`dynpos.training.checkpoint.read_checkpoint`, i.e. ``torch.load(weights_only=True)``
  with one-line errors, so a crafted checkpoint cannot run code through the trainer either.

Remote paths (``s3://``, ...) fall back to Lightning's ``TorchCheckpointIO``, which uses an fsspec
transaction.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dynpos.training.checkpoint import read_checkpoint

TMP_MARK = ".tmp-"  # temporary files are ``.<name>.tmp-<pid>`` beside the target


def _is_local(path: _PATH) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (a string from a temporary file's name) still runs on this machine."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` through a temporary file, ``fsync`` and ``os.replace``.

    Raises:
        OSError: the folder cannot be created or written (the temporary file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}{TMP_MARK}*"):  # left by a killed process
        if not _alive(stale.name.rpartition(TMP_MARK)[2]):
            with contextlib.suppress(OSError):
                stale.unlink()
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (not possible on every OS)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes and ``weights_only`` reads (see the module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically.

        Raises:
            TypeError: ``storage_options`` given (as Lightning's ``TorchCheckpointIO``).
            OSError: the folder cannot be written.
        """
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Read a checkpoint with ``torch.load(weights_only=True)`` onto the CPU (Lightning moves
        the states to the device when it restores them).

        Raises:
            CheckpointError: missing, truncated, corrupted or unsafe file (a ``ValueError``).
            ValueError: ``weights_only=False`` was asked for: dynpos never unpickles arbitrary objects.
        """
        if weights_only is False:
            raise ValueError("dynpos reads checkpoints with weights_only=True only (a pickle could run code)")
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return read_checkpoint(str(path).removeprefix("file://"), "ckpt_path")
