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

TMP_MARK = ".tmp-"  # temporary files are ``.<name>.tmp-<pid>-<random><suffix>`` beside the target


def _alive(pid: str) -> bool:
    """Whether process ``pid`` (a string from a temporary file's name) still runs on this machine."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except OSError:  # exists but belongs to someone else
        pass
    return True


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it replaces ``path``, on an exception it is removed.

    The temporary name keeps ``path``'s suffix (``savefig`` and ``np.save`` choose a format by it). Stale
    temporary files of ``path`` left by killed processes are removed first.

    Args:
        path: the file to write; its folder is created.
        fsync: flush the file and the folder to disk (for checkpoints).

    Raises:
        OSError: the folder cannot be created or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}{TMP_MARK}*"):
        if not _alive(stale.name[len(path.name) + 1 + len(TMP_MARK):].partition("-")[0]):
            with contextlib.suppress(OSError):
                stale.unlink()
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"
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
