"""Checkpoints that carry everything needed to use them again (litgpt's rule): ``state_dict`` (``model.*``),
:class:`~dynpos.training.module.LitGPT`'s ``hyper_parameters`` (the whole run config, stored once) and the
datamodule's state with the ``tokenizers`` JSON; read with ``torch.load(weights_only=True)`` here and, through
:class:`AtomicCheckpointIO`, in the trainer (README, Resuming and scaling out).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from tokenizers import Tokenizer

from dynpos.atomic import atomic_path
from dynpos.model.gpt import GPT, GPTConfig


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or not a dynpos checkpoint."""


def _first_line(error: BaseException, limit: int = 160) -> str:
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def read_checkpoint(path: str | Path, key: str = "ckpt", mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)`` onto the CPU (``mmap``: the tensors' storage mapped from the file),
    with errors that name ``key``, the config key the path came from, and the fix.

    Raises:
        CheckpointError: the path is missing or a directory; the file is truncated or corrupted; or it holds
            objects other than tensors and plain containers (a pickle that could run code: refused unrun).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        inside = [p for p in (path / "checkpoints" / "last.ckpt", path / "last.ckpt") if p.is_file()]
        hint = f"e.g. {key}={inside[0]}" if inside else f"e.g. {key}=<run>/checkpoints/last.ckpt"
        raise CheckpointError(f"{key}={path} is a directory: give the checkpoint file itself, {hint}")
    if not path.is_file():
        raise CheckpointError(f"{key}={path}: no such checkpoint file (look in <run>/checkpoints/last.ckpt)")
    try:
        if not zipfile.is_zipfile(path):  # what torch.save writes; pickle would misreport other files as unsafe
            raise ValueError("not the zip archive torch.save writes")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        found = re.search(r"(?:Unsupported global|Unsupported operand)[^.\n]*", str(error))
        detail = f" ({found.group(0).strip()})" if found else ""
        raise CheckpointError(
            f"{key}={path}: refused to load: the file holds objects other than tensors and plain containers, "
            f"which could run code when unpickled{detail}; use a checkpoint written by dynpos"
        ) from None
    except Exception as error:  # noqa: BLE001 - a damaged file fails in many ways inside torch.load
        raise CheckpointError(
            f"{key}={path}: not a readable checkpoint (truncated or corrupted: {_first_line(error)}); "
            "use another one, e.g. the run's last.ckpt or best.ckpt"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{key}={path}: not a Lightning checkpoint (holds a {type(checkpoint).__name__})")
    return checkpoint


def load_checkpoint(path: str | Path, key: str = "ckpt", mmap: bool = False) -> dict:
    """:func:`read_checkpoint`, then check that the file has dynpos's entries (``CheckpointError`` if it lacks
    ``state_dict``, ``hyper_parameters`` or the run config)."""
    checkpoint = read_checkpoint(path, key, mmap=mmap)
    missing = [k for k in ("state_dict", "hyper_parameters") if k not in checkpoint]
    if "config" not in checkpoint.get("hyper_parameters", {}):
        missing.append("hyper_parameters.config")
    if missing:
        raise CheckpointError(f"{key}={path}: not a dynpos checkpoint (missing {', '.join(missing)})")
    return checkpoint


def checkpoint_tokenizer(checkpoint: dict, key: str = "ckpt") -> Tokenizer:
    """The tokenizer stored in a checkpoint dict (``CheckpointError``: none, or one ``tokenizers`` cannot read)."""
    # Lightning stores the datamodule's state under its class name (TextDataModule, TaskDataModule...)
    state = next((v for v in checkpoint.values() if isinstance(v, dict) and isinstance(v.get("tokenizer"), str)), {})
    if not state:
        raise CheckpointError(f"{key}: the checkpoint holds no tokenizer: was it saved by a dynpos run?")
    try:
        return Tokenizer.from_str(state["tokenizer"])
    except Exception as error:  # noqa: BLE001 - tokenizers raises its own exception type
        raise CheckpointError(f"{key}: the checkpoint's tokenizer is unreadable: {_first_line(error)}") from None


def build_model(config: dict, vocab_size: int, **overrides) -> GPT:
    """The GPT of a run config's ``model`` (``overrides`` on top) and ``pos``; ``vocab_size`` unless the config
    sets ``model.vocab_size``."""
    model = {**config["model"], "vocab_size": config["model"].get("vocab_size") or vocab_size, **overrides}
    return GPT(GPTConfig(**model), pos=instantiate(config["pos"]))


def load_model(path: str | Path, key: str = "ckpt") -> tuple[GPT, Tokenizer, dict]:
    """Rebuild the trained model and its tokenizer from a checkpoint alone.

    Returns:
        ``(model, tokenizer, hyper_parameters)``: the model in eval mode on the CPU, not compiled;
        ``hyper_parameters["config"]`` is the run's whole config.

    Raises:
        CheckpointError: as :func:`load_checkpoint`, or the weights do not fit the model of the checkpoint's config.
    """
    checkpoint = load_checkpoint(path, key)
    hp = checkpoint["hyper_parameters"]
    try:
        model = build_model(hp["config"], hp["vocab_size"], compile=False)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{key}={path}: its model config does not build a dynpos GPT: "
                              f"{_first_line(error)}") from None
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{key}={path}: weights do not match the model config stored in it: "
                              f"{_first_line(error)}") from None
    return model.eval(), checkpoint_tokenizer(checkpoint, f"{key}={path}"), hp


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
