"""Entry-point glue shared by train.py and the scripts: bad input becomes one line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

# What a user's input can cause: these print as one line and exit with status 2. FileExistsError:
# a run folder that holds a run; IsADirectoryError and co.: a path of the wrong kind.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError, FloatingPointError, OmegaConfBaseException, ConnectionError)


def guard(fn: Callable[[], T]) -> T:
    """Run ``fn``; a user error prints ``error: <message>`` on one line and exits with status 2.

    ``HYDRA_FULL_ERROR=1`` or ``DYNPOS_DEBUG=1`` shows the full traceback instead.
    """
    try:
        return fn()
    except USER_ERRORS as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("DYNPOS_DEBUG") == "1":
            raise
        message = " ".join(str(error).split())
        print(f"error: {message} (set DYNPOS_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


def run_cli(cfg: DictConfig) -> dict:
    """``train.py``'s body: :func:`~dynpos.training.preflight.preflight`, then
    :func:`dynpos.training.run.train`, both under :func:`guard`. The preflight checks run before
    Lightning and the data stack are imported, so a bad command (or checkpoint) fails in seconds."""

    def main() -> dict:
        from dynpos.training.preflight import preflight

        preflight(cfg)
        from dynpos.training.run import train

        return train(cfg)

    return guard(main)


def script_config(defaults: dict, argv: list[str] | None = None) -> DictConfig:
    """Parse ``key=value`` arguments of a script over its ``defaults`` (``???`` marks a required key).

    Values of keys whose default is a string stay verbatim (``prompt=ROMEO:`` is the text
    ``ROMEO:``); other values are read as YAML (``eval.lengths=[64,128]``, ``top_k=null``) and must
    have the default's type: a whole number for an int, a number for a float, true/false for a
    bool, a list for a list (null is accepted where the default is null).

    Raises:
        ValueError: for an argument without ``=``, an unknown key (naming the known ones), a value
            of the wrong type (naming the key) or a missing required key.
    """
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(defaults)
    known = [k for k, _ in _leaves(defaults)]
    for arg in sys.argv[1:] if argv is None else argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ValueError(f"arguments are key=value pairs, got {arg!r} (e.g. ckpt=runs/<run>/checkpoints/best.ckpt)")
        if key not in known:
            raise ValueError(f"unknown key {key!r}: choose from {', '.join(known)}")
        default = OmegaConf.select(cfg, key, throw_on_missing=False)
        if isinstance(default, str) or OmegaConf.is_missing(cfg, key):
            OmegaConf.update(cfg, key, value)
        else:
            parsed = OmegaConf.from_dotlist([f"v={value}"]).v
            _check_type(key, value, parsed, default)
            OmegaConf.update(cfg, key, parsed)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"{missing[0]} is required: pass {missing[0]}=<value>")
    return cfg


def _check_type(key: str, text: str, value, default) -> None:
    """Raise ``ValueError`` when ``value`` (parsed from ``text``) lacks the type of ``default``."""
    from omegaconf import OmegaConf

    if default is None:
        return
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif OmegaConf.is_list(default) or isinstance(default, list):
        ok, want = OmegaConf.is_list(value) or isinstance(value, list), "a list such as [1,2]"
    else:
        return
    if not ok:
        raise ValueError(f"{key}={text}: give {want} (default {default})")


def _leaves(tree: dict, prefix: str = ""):
    """``(dotted key, value)`` for every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
