"""Entry-point glue shared by train.py and the scripts: bad input becomes one line, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")

# What a user's input can cause: these print as one line and exit with status 2. FileExistsError:
# a run folder that holds a run; IsADirectoryError and co.: a path of the wrong kind; ImportError:
# an optional package a choice needs (the default corpus, tensorboard); ConnectionError: a hub corpus
# or tokenizer while offline (dynpos.data.corpora.HubUnavailableError).
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError, FloatingPointError, OmegaConfBaseException, ConnectionError, ImportError)


def guard(fn: Callable[[], T], on_error: Callable[[], None] | None = None) -> T:
    """Run ``fn``; a user error prints ``error: <message>`` on one line and exits with status 2.

    ``on_error`` runs first (e.g. to remove a run folder the refused command created).
    ``HYDRA_FULL_ERROR=1`` or ``DYNPOS_DEBUG=1`` shows the full traceback instead.
    """
    try:
        try:
            return fn()
        except InstantiationException as wrapped:  # a constructor's own check, under Hydra's instantiate
            if isinstance(wrapped.__cause__, USER_ERRORS):
                raise wrapped.__cause__ from None
            raise
    except USER_ERRORS as error:
        if on_error is not None:
            on_error()
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("DYNPOS_DEBUG") == "1":
            raise
        message = " ".join(str(error).split())
        print(f"error: {message} (set DYNPOS_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
