"""The LightningDataModule: corpus -> tokenizer -> cached flat token arrays -> batches.

Cache (``cache_dir``, default ``~/.cache/dynpos``)::

    <corpus name>-<corpus fingerprint[:12]>/
        tokenizer-<kind>-<config hash[:12]>.json      built on the train split (or fetched)
        tokens-<tokenizer fingerprint[:16]>/<split>.npy   flat token ids, uint16 or uint32
        tokens-<tokenizer fingerprint[:16]>/<split>.json  token and UTF-8 byte counts

A split is tokenized once (``datasets.Dataset.map``) and then read as a memory map; with everything cached, the
corpus itself is not even loaded. Training batches are a function of the step (``StepBatches``; ranks differ
through the seed, not a ``DistributedSampler``), evaluation windows fixed (``FixedWindows``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, IterableDataset

from dynpos.atomic import atomic_path, write_json
from dynpos.data.corpora import SPLITS, check_int, corpus_fingerprint, load_corpus
from dynpos.data.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, tokenizer_fingerprint

_MAP_BATCH = 256  # rows per tokenizer call in Dataset.map


def _plain(obj: Any) -> Any:
    """An OmegaConf container as plain dicts and lists; any other value as it is."""
    return OmegaConf.to_container(obj, resolve=True) if isinstance(obj, (DictConfig, ListConfig)) else obj


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The generator seed of training batch ``step`` on ``rank``: 63 bits of BLAKE2b of the triple."""
    digest = hashlib.blake2b(f"dynpos/{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _texts(split_ds, max_chars: int | None = None) -> Iterator[str]:
    """The rows of a split as strings, stopping after ``max_chars`` characters when given."""
    left = math.inf if max_chars is None else max_chars
    for batch in split_ds.iter(batch_size=_MAP_BATCH):
        for text in batch["text"]:
            if left <= 0:
                return
            yield text if len(text) <= left else text[:left]
            left -= len(text)


def tokenize_split(split_ds, tok: Tokenizer, path: str, desc: str = "tokenizing") -> dict[str, int]:
    """Tokenize a ``datasets`` (Iterable)Dataset with column ``text`` into ``path``, one flat ``.npy`` of ids
    (``uint16`` under 65536 tokens, else ``uint32``); return ``{"tokens": n, "bytes": UTF-8 bytes of the text}``."""
    dtype = np.dtype(np.uint16 if tok.get_vocab_size() < 65536 else np.uint32)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode_rows(batch: dict[str, list[str]]) -> dict[str, list]:
        return {"ids": [np.asarray(e.ids, dtype=np.uint32) for e in encode(batch["text"], add_special_tokens=False)],
                "n_bytes": [len(t.encode("utf-8")) for t in batch["text"]]}

    kwargs: dict[str, Any] = {"batched": True, "batch_size": _MAP_BATCH, "remove_columns": ["text"]}
    if hasattr(split_ds, "_fingerprint"):  # map-style: name the result, skip hashing the closure
        fp = f"{split_ds._fingerprint}/{tokenizer_fingerprint(tok)}"
        kwargs.update(desc=desc, new_fingerprint=hashlib.sha256(fp.encode()).hexdigest()[:16])
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (0,)}
    n_tokens = n_bytes = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for table in split_ds.map(encode_rows, **kwargs).with_format("arrow").iter(batch_size=_MAP_BATCH):
            flat = pc.list_flatten(table["ids"]).to_numpy(zero_copy_only=False).astype(dtype)
            f.write(flat.tobytes())
            n_tokens += flat.size
            n_bytes += int(pc.sum(table["n_bytes"]).as_py() or 0)
        f.seek(0)  # the count is known only now; numpy pads the shape so that the header keeps its length
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (n_tokens,)})
    return {"tokens": n_tokens, "bytes": n_bytes}


class _Tokens:
    """Holds a token array; pickles a memory map as its file name, not its contents."""

    tokens: np.ndarray

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if isinstance(self.tokens, np.memmap) and self.tokens.filename:
            state["tokens"] = os.fspath(self.tokens.filename)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["tokens"], str):
            state["tokens"] = np.load(state["tokens"], mmap_mode="r")
        self.__dict__.update(state)


def _windows(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.from_numpy(np.asarray(tokens[offsets[:, None] + np.arange(block_size + 1)], dtype=np.int64))
    return w[:, :-1], w[:, 1:]


def train_steps(trainer: L.Trainer | None, max_steps: int | None = None) -> tuple[int, int | None]:
    """``(start, stop)``: the micro-batches to serve, ``start <= s < stop`` (None: endless).

    ``start = global_step * accumulate_grad_batches`` (0 without a trainer): on resume Lightning builds
    the train loader after the checkpoint restored ``global_step``, so batches continue where the run
    left off. ``stop = (max_steps or trainer.max_steps when positive) * accumulate_grad_batches``.
    """
    accumulate = getattr(trainer, "accumulate_grad_batches", 1) if trainer is not None else 1
    start = trainer.global_step * accumulate if trainer is not None else 0
    if max_steps is None and trainer is not None and (trainer.max_steps or 0) > 0:
        max_steps = trainer.max_steps
    return start, None if max_steps is None else max(max_steps * accumulate, start)


class StepBatches(_Tokens, Dataset):
    """Training batches indexed by step (nanoGPT's random windows, made a function of the step).

    ``self[s]`` is ``(x, y)``, int64 ``(batch_size, block_size)``: windows ``w`` of ``block_size + 1``
    tokens, ``x = w[:, :-1]``, ``y = w[:, 1:]``, at offsets drawn uniformly from ``[0, len(tokens) -
    block_size)`` by a ``torch.Generator`` seeded with ``step_seed(seed, s, rank)``.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int = 0, rank: int = 0):
        self.tokens, self.block_size, self.batch_size, self.seed, self.rank = tokens, block_size, batch_size, seed, rank

    def offsets(self, step: int) -> np.ndarray:
        """The ``(batch_size,)`` window offsets of batch ``step``."""
        g = torch.Generator().manual_seed(step_seed(self.seed, step, self.rank))
        return torch.randint(0, len(self.tokens) - self.block_size, (self.batch_size,), generator=g).numpy()

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step < 0:
            raise IndexError(f"step {step} < 0")
        return _windows(self.tokens, self.offsets(step), self.block_size)


class StepStream(IterableDataset):
    """Yields ``batches[s]`` for ``s = start, ..., stop - 1`` (forever when ``stop`` is None).

    ``len()`` is ``stop``, the one long epoch counted from step 0: on resume Lightning ends the epoch
    when the restored count of seen batches reaches it. Worker ``k`` of ``n`` makes steps ``start + k,
    start + k + n, ...``; the DataLoader's round-robin keeps step order.
    """

    def __init__(self, batches: StepBatches, start: int = 0, stop: int | None = None):
        self.batches, self.start, self.stop = batches, start, stop

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("an endless step stream has no length")
        return self.stop

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        k, n = (info.id, info.num_workers) if info else (0, 1)
        step = self.start + k
        while self.stop is None or step < self.stop:
            yield self.batches[step]
            step += n


class StepLoader(DataLoader):
    """The train DataLoader over a ``StepStream``: its position is a function of the global step, so
    its (empty) state methods only tell Lightning that it resumes exactly."""

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.dataset.start, "stop": self.dataset.stop}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FixedWindows(_Tokens, Dataset):
    """Evaluation windows: ``count`` of the ``slots = (len(tokens) - 1) // block_size`` non-overlapping
    windows (window ``k`` spans tokens ``[k * block_size, (k + 1) * block_size]``), evenly spaced (slot
    ``floor(i * slots / count)``), all of them when ``count`` is None or exceeds ``slots``.
    ``self[i]`` is ``(x, y)``, int64 ``(block_size,)``.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, count: int | None = None):
        slots = (len(tokens) - 1) // block_size
        count = slots if count is None else min(count, slots)
        self.tokens, self.block_size = tokens, block_size
        self.offsets = (np.arange(count) * slots // count) * block_size

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _windows(self.tokens, self.offsets[i : i + 1], self.block_size)
        return x[0], y[0]


class StepDataModule(L.LightningDataModule):
    """What the text and task datamodules share: loader settings, the train loader over ``train_batches()`` (a
    function of the step) and the loaders over the fixed evaluation sets ``splits`` that ``setup()`` builds. Raises
    ValueError for ``batch_size``, ``eval_batch_size`` (None = ``batch_size``) or ``num_workers`` out of range.
    """

    collate: Callable | None = None  # the collate_fn of the evaluation loaders (None: torch's default)

    def __init__(self, batch_size: int, eval_batch_size: int | None, block_size: int, seed: int,
                 max_steps: int | None, num_workers: int) -> None:
        super().__init__()
        check_int("batch_size", batch_size)
        check_int("eval_batch_size", eval_batch_size, null=", or null")
        check_int("num_workers", num_workers, 0, "an integer >= 0 (0: the main process)")
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.block_size, self.seed, self.max_steps, self.num_workers = block_size, seed, max_steps, num_workers
        self.tokenizer: Tokenizer | None = None
        self.splits: dict[str, Any] = {}  # the evaluation sets
        self.bytes_per_token: dict[str, float] = {}  # stays empty for tasks: they report no bits per byte

    @property
    def vocab_size(self) -> int:
        """Number of token ids (``tokenizer.get_vocab_size()``). Raises RuntimeError before ``setup()``, tasks too."""
        self._require_setup()
        return self.tokenizer.get_vocab_size()

    def train_dataloader(self) -> DataLoader:
        """Batches ``train_batches()[s]``, ``(x, y)`` int64 ``(B, T)``, for the steps of ``train_steps``."""
        stream = StepStream(self.train_batches(), *train_steps(self.trainer, self.max_steps))
        return self._loader(stream, batch_size=None, cls=StepLoader)

    def eval_dataloader(self, split: str = "validation") -> DataLoader:
        """Deterministic loader over the evaluation set ``splits[split]``: ``(x, y)`` int64 ``(B, T)``. Raises
        ValueError for a split without one."""
        self._require_setup()
        if split not in self.splits:
            raise ValueError(f"split={split!r}: choose one of {', '.join(self.splits)}")
        return self._loader(self.splits[split], self.eval_batch_size, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("validation")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def state_dict(self) -> dict[str, Any]:
        """The tokenizer's JSON, so that a checkpoint is usable alone; nothing is restored on load (batches are a
        function of the step; ``dynpos.training.run.open_run`` compares the data configs)."""
        self._require_setup()
        return {"tokenizer": self.tokenizer.to_str()}

    def _loader(self, dataset, batch_size: int | None, cls: type[DataLoader] = DataLoader, **kwargs) -> DataLoader:
        return cls(dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                   persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(), **kwargs)

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _require_setup(self) -> None:
        if self.tokenizer is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() first")


class TextDataModule(StepDataModule):
    """Corpus, tokenizer, cached token arrays and the train/validation/test dataloaders.

    The keys of ``configs/data/<corpus>.yaml`` (``name`` and the corpus's ``**options``: ``load_corpus``), the
    ``tokenizer`` group, and from the pipeline ``block_size`` (tokens per window), ``seed``, ``cache_dir`` and
    ``max_steps`` (optimizer steps; default ``trainer.max_steps``). ``val_windows``: windows per evaluation split
    (``FixedWindows``), None = all. ``tokenizer_json``: a checkpoint's tokenizer, used instead of building one.

    After ``setup()``: ``tokenizer``, ``vocab_size``, ``tokens`` (``{split: np.ndarray}``, flat ids, memory-mapped),
    ``bytes_per_token`` (``{split: float}``: bits per byte = loss in nats / ln 2 / bytes_per_token) and
    ``fingerprint`` (``tokenizer_fingerprint``). Raises ValueError for bad settings or corpus options (naming the
    ``data.<key>``) or, at ``setup``, a ``block_size`` beyond a split's tokens; FileNotFoundError for textfiles paths
    that match nothing.
    """

    def __init__(self, name: str = "shakespeare", tokenizer: Mapping[str, Any] | None = None, batch_size: int = 32,
                 val_windows: int | None = 128, block_size: int = 256, seed: int = 0,
                 cache_dir: str = "~/.cache/dynpos", max_steps: int | None = None, num_workers: int = 0,
                 eval_batch_size: int | None = None, tokenizer_json: str | None = None, **options: Any):
        super().__init__(batch_size, eval_batch_size, block_size, seed, max_steps, num_workers)
        check_int("val_windows", val_windows, null=" (or null for every window)")
        self.options = {k: _plain(v) for k, v in options.items()}
        self.corpus = {"name": name, **self.options}
        self.corpus_key = corpus_fingerprint(name, **self.options)  # checks name and options, early
        tokenizer = _plain(tokenizer) if tokenizer else {"kind": "char"}
        self.tokenizer_cfg = {k: tokenizer.get(k) for k in ("kind", "vocab_size", "max_train_chars")}
        self.cache_dir = os.path.expanduser(os.fspath(cache_dir))
        self.val_windows, self.tokenizer_json = val_windows, tokenizer_json
        self.tokens: dict[str, np.ndarray] = {}
        self.fingerprint: str | None = None
        self._corpus_ds = None

    def _split(self, split: str):
        if self._corpus_ds is None:
            self._corpus_ds = load_corpus(self.corpus["name"], **self.options)
        return self._corpus_ds[split]

    def prepare_data(self) -> None:
        """Build what the cache lacks (tokenizer, then each split's token array) and load it; idempotent. Raises
        ValueError when ``block_size`` exceeds the tokens of a split."""
        if self.tokenizer is not None:
            return
        root = os.path.join(self.cache_dir, f"{self.corpus['name']}-{self.corpus_key[:12]}")
        cfg = self.tokenizer_cfg
        digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
        path = os.path.join(root, f"tokenizer-{cfg['kind']}-{digest[:12]}.json")
        if self.tokenizer_json is not None:  # a checkpoint's
            tok = Tokenizer.from_str(self.tokenizer_json)
        elif os.path.isfile(path):
            tok = load_tokenizer(path)
        else:
            texts = _texts(self._split("train"), cfg["max_train_chars"]) if cfg["kind"] in ("char", "bpe") else ()
            tok = build_tokenizer(cfg["kind"], texts, cfg["vocab_size"])
            save_tokenizer(tok, path)
        fp = tokenizer_fingerprint(tok)
        folder = os.path.join(root, f"tokens-{fp[:16]}")
        for split in SPLITS:
            npy, meta = os.path.join(folder, f"{split}.npy"), os.path.join(folder, f"{split}.json")
            if not (os.path.isfile(npy) and os.path.isfile(meta)):
                counts = tokenize_split(self._split(split), tok, npy, desc=f"tokenizing {self.corpus['name']} {split}")
                write_json(meta, {**counts, "split": split, "corpus": self.corpus, "tokenizer": fp,
                                  "vocab_size": tok.get_vocab_size()})
            info = json.loads(Path(meta).read_text())
            self.tokens[split] = np.load(npy, mmap_mode="r")
            self.bytes_per_token[split] = info["bytes"] / info["tokens"] if info["tokens"] else math.nan
            self.splits[split] = FixedWindows(self.tokens[split], self.block_size, self.val_windows)
        self._corpus_ds = None  # the token arrays hold what later steps need
        shortest = min(SPLITS, key=lambda s: len(self.tokens[s]))
        if len(self.tokens[shortest]) < self.block_size + 1:
            raise ValueError(f"data.block_size={self.block_size} exceeds the {len(self.tokens[shortest])} tokens of "
                             f"the {shortest} split of corpus {self.corpus['name']!r} (a window needs block_size + 1): "
                             "lower model.block_size or use a larger corpus")
        self.tokenizer, self.fingerprint = tok, fp

    def setup(self, stage: str | None = None) -> None:
        """``prepare_data`` on every process (Lightning runs that one on one process per node)."""
        self.prepare_data()

    def train_batches(self) -> StepBatches:
        """The step-indexed training batches of this rank (``StepBatches`` seeded with the trainer's global rank)."""
        self._require_setup()
        return StepBatches(self.tokens["train"], self.block_size, self.batch_size, self.seed, self._rank())
