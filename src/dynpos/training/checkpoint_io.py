"""Lightning ``CheckpointIO`` that writes checkpoints atomically and reads them safely (README, Resuming and
scaling out). Every trainer preset names it under ``plugins:``, so each checkpoint the ``Trainer`` saves or restores
goes through it. Remote paths (``s3://``, ...) go to Lightning's ``TorchCheckpointIO``.
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
    """``TorchCheckpointIO`` writing by :func:`~dynpos.atomic.atomic_path` with ``fsync`` (a kill leaves the
    previous checkpoint or the new one) and reading by :func:`~dynpos.training.checkpoint.read_checkpoint`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (``OSError``: the folder cannot be written)."""
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(str(path).removeprefix("file://"), fsync=True) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(self, path: _PATH, map_location: Any = None, weights_only: bool | None = None) -> dict:
        """Read a checkpoint onto the CPU (Lightning moves the states to the device when it restores them).

        Raises:
            CheckpointError: a missing, truncated, corrupted or unsafe file.
            ValueError: ``weights_only=False`` was asked for: dynpos never unpickles arbitrary objects.
        """
        if weights_only is False:
            raise ValueError("dynpos reads checkpoints with weights_only=True only (a pickle could run code)")
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return read_checkpoint(str(path).removeprefix("file://"), "ckpt_path")
