"""Lightning ``CheckpointIO`` that writes checkpoints atomically and reads them safely.

Wired into every trainer config (``configs/trainer/cpu.yaml``, ``plugins:``), so each checkpoint
the ``Trainer`` saves (``ModelCheckpoint``'s ``best.ckpt`` and ``last.ckpt``) and each one it
restores (``trainer.fit(ckpt_path=...)``, ``trainer.test(ckpt_path="best")``) goes through it:

- save: :func:`dynpos.atomic.atomic_path` with ``fsync``: a process killed at any moment leaves
  either the previous checkpoint or the new one, never a torn file; at worst a stale temporary
  file, which the next save of that name removes once its process is gone.
- load: :func:`dynpos.training.checkpoint.read_checkpoint`, i.e. ``torch.load(weights_only=True)``
  with one-line errors, so a crafted checkpoint cannot run code through the trainer either.

Remote paths (``s3://``, ...) fall back to Lightning's ``TorchCheckpointIO``, which uses an fsspec
transaction.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dynpos.atomic import atomic_path
from dynpos.training.checkpoint import read_checkpoint


def _is_local(path: _PATH) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


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
        with atomic_path(str(path).removeprefix("file://"), fsync=True) as tmp:
            torch.save(checkpoint, tmp)

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
