"""The one way dynpos writes a file: through a temporary file beside it and ``os.replace``.

A process killed at any moment leaves either the old file or the new one, never a torn one. Every writer
in dynpos (checkpoints, token arrays, tokenizers, JSON, CSV, PNG, reports) goes through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path``, on an exception it is removed.

    The temporary name, ``.<name>.tmp-<pid>-<random><suffix>``, keeps ``path``'s suffix (``savefig`` and
    ``np.save`` choose a format by it). Temporary files of ``path`` whose process no longer runs are removed first.

    Args:
        path: the file to write; its folder is created.
        fsync: flush the file and the folder to disk (for checkpoints).

    Raises:
        OSError: the folder cannot be created or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mark = f".{path.name}.tmp-"
    for stale in path.parent.glob(f"{mark}*"):
        try:
            os.kill(int(stale.name.removeprefix(mark).partition("-")[0]), 0)  # signal 0: does its writer still run?
        except (ValueError, ProcessLookupError):  # no: a killed process's leftover
            with contextlib.suppress(OSError):
                stale.unlink()
        except OSError:  # yes, as another user
            pass
    tmp = path.parent / f"{mark}{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if fsync:
        with contextlib.suppress(OSError):  # persist the rename itself (not possible on every OS)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically; non-JSON values become strings."""
    write_text(path, json.dumps(payload, indent=2, default=str))
