"""Entry-point glue shared by train.py and the scripts: bad input becomes one line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

# What a user's input can cause: these print as one line and exit with status 2. FileExistsError:
# a run folder that holds a run; ImportError: an optional package a choice needs (the default corpus,
# tensorboard); ConnectionError: a hub corpus or tokenizer while offline.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError, FloatingPointError, OmegaConfBaseException, ConnectionError, ImportError)


def guard(fn: Callable[[], Any], on_error: Callable[[], None] = lambda: None) -> Any:
    """Run ``fn``; a user error, also one that a constructor raised under Hydra's ``instantiate``, runs
    ``on_error``, prints ``error: <message>`` on one line and exits with status 2 (``HYDRA_FULL_ERROR=1`` or
    ``DYNPOS_DEBUG=1``: the traceback instead)."""
    try:
        return fn()
    except (*USER_ERRORS, InstantiationException) as raised:
        error = raised.__cause__ if isinstance(raised, InstantiationException) else raised
        if not isinstance(error, USER_ERRORS):
            raise
        on_error()
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("DYNPOS_DEBUG") == "1":
            raise
        print(f"error: {' '.join(str(error).split())} (set DYNPOS_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
