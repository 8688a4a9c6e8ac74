"""Checkpoints that carry everything needed to use them again: weights, model and scheme config, tokenizer.

A Lightning checkpoint written by ``train.py`` holds ``state_dict`` (``model.*``), the module's
``hyper_parameters`` (``model``, ``pos``, ``optim``, ``vocab_size``), the whole run ``config`` and
the datamodule's state with the tokenizer (the ``tokenizers`` JSON). Loading uses ``torch.load(weights_only=True)``, so a crafted file cannot
run code.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from hydra.utils import instantiate
from tokenizers import Tokenizer

from dynpos.data.datamodule import TextDataModule
from dynpos.model.gpt import GPT, GPTConfig


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not a dynpos checkpoint."""


def load_checkpoint(path: str | Path, key: str = "ckpt") -> dict:
    """Read a checkpoint file safely.

    Args:
        path: the ``.ckpt`` file.
        key: the config key the path came from, named in error messages.

    Raises:
        CheckpointError: if the file does not exist, is truncated or corrupted, holds objects
            other than tensors and plain containers, or lacks dynpos's entries.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{key}={path}: no such checkpoint file (look in <run>/checkpoints/last.ckpt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{key}={path}: refused to load objects other than tensors and plain containers "
            f"(weights_only=True): {str(error).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"{key}={path}: not a readable checkpoint (truncated or corrupted?): {error}") from None
    missing = [k for k in ("state_dict", "hyper_parameters", TextDataModule.__qualname__) if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{key}={path}: not a dynpos checkpoint (missing {', '.join(missing)})")
    return checkpoint


def load_model(path: str | Path, key: str = "ckpt") -> tuple[GPT, Tokenizer, dict]:
    """Rebuild the trained model and its tokenizer from a checkpoint alone.

    Returns:
        ``(model, tokenizer, hyper_parameters)``; the model is in eval mode on the CPU.

    Raises:
        CheckpointError: as :func:`load_checkpoint`, or if the weights do not fit the model
            described by the checkpoint's own config.
    """
    checkpoint = load_checkpoint(path, key)
    hp = checkpoint["hyper_parameters"]
    model = GPT(GPTConfig(vocab_size=hp["vocab_size"], **hp["model"]), pos=instantiate(hp["pos"]))
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{key}={path}: weights do not match the model config stored in it: "
                              f"{str(error).splitlines()[0]}") from None
    tokenizer = TextDataModule.tokenizer_from_checkpoint(checkpoint)
    return model.eval(), tokenizer, hp
