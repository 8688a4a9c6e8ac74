"""Synthetic length-generalization tasks, generated from the seed: train short, test long.

The instrument of Kazemnejad et al. 2023 ("The Impact of Positional Encoding on Length Generalization in
Transformers", NeurIPS; code: McGill-NLP/length-generalization), Ruoss et al. 2023 and Delétang et al. 2023:
train on lengths up to ``L``, score exact match at ``L``, ``1.5L``, ``2L``, ``4L``. An example is ``prompt =
answer .``, its length ``n`` counted in task units: copy, reverse, sort, addition, recall (associative recall,
Ba et al. 2016) and passkey (Mohtashami & Jaggi 2023), each described in its ``configs/data/<task>.yaml``.
Evaluation instances are never trained on (``held_out``); batches are a function of the step (``TaskBatches``).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from dynpos.data.corpora import check_int
from dynpos.data.datamodule import StepDataModule, _plain, step_seed

TASKS = ("copy", "reverse", "sort", "addition", "recall", "passkey")
PAD, UNK, SEP, END = "<pad>", "<unk>", "=", "."
SPECIALS = (PAD, UNK, SEP, END)
PAD_ID, UNK_ID, SEP_ID, END_ID = range(4)
DEFAULT_ALPHABET = {"copy": 10, "reverse": 10, "sort": 10, "addition": 10, "recall": 64, "passkey": 10}
DEFAULT_PASSKEY_DIGITS = 5
_MAX_TRIES = 10_000  # draws per instance before a length is declared impossible for a split
# step_seed ranks of the fixed sets: evaluation sets from eval_seed (the same for every run), the pool from seed.
_STREAMS = {"validation": -1, "test": -2, "lengthgen": -3, "pool": -4}


@dataclass(frozen=True)
class Example:
    """One instance: ``length`` in task units, ``prompt`` token ids ending with the separator,
    ``answer`` token ids ending with the end token."""

    length: int
    prompt: tuple[int, ...]
    answer: tuple[int, ...]

    @property
    def tokens(self) -> tuple[int, ...]:
        """The whole example: ``prompt + answer``."""
        return self.prompt + self.answer


def held_out(prompt: Sequence[int]) -> bool:
    """Whether an instance belongs to evaluation (1 in 8 do): BLAKE2b of its prompt ids, modulo 8, is 0."""
    digest = hashlib.blake2b(",".join(map(str, prompt)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 8 == 0


class Task:
    """A task's vocabulary (``words``: the 4 specials, then the task's symbols) and instance generator. ``name``:
    one of ``TASKS``; the others as in ``configs/data/<name>.yaml`` (``alphabet`` None: ``DEFAULT_ALPHABET[name]``).
    Raises ValueError for an unknown task or an alphabet that is not an integer >= 2.
    """

    def __init__(self, name: str, alphabet: int | None = None, lsd_first: bool = False,
                 passkey_digits: int = DEFAULT_PASSKEY_DIGITS) -> None:
        if name not in TASKS:
            raise ValueError(f"data.task={name!r} is not a task: choose one of {', '.join(TASKS)}")
        alphabet = DEFAULT_ALPHABET[name] if alphabet is None else alphabet
        check_int("alphabet", alphabet, 2, f"an integer >= 2 for task {name}")
        self.name, self.alphabet, self.lsd_first, self.passkey_digits = name, alphabet, lsd_first, passkey_digits
        if name == "recall":
            words = [f"k{i}" for i in range(alphabet)] + [f"v{i}" for i in range(alphabet)]
        elif name == "passkey":
            words = [*map(str, range(10)), "key", *(f"f{i}" for i in range(alphabet))]
        elif name == "addition":
            words = [*map(str, range(alphabet)), "+"]
        else:
            words = [chr(ord("a") + i) if alphabet <= 26 else f"s{i}" for i in range(alphabet)]
        self.words = [*SPECIALS, *words]
        self.first = len(SPECIALS)  # id of the first task symbol

    def n_tokens(self, n: int) -> int:
        """Tokens in a whole example of length ``n`` (prompt, separator, answer, end token)."""
        extra = {"addition": (3, 4), "recall": (2, 4), "passkey": (1, 2 * self.passkey_digits + 3)}
        scale, offset = extra.get(self.name, (2, 2))
        return scale * n + offset

    def tokenizer(self) -> Tokenizer:
        """A ``WordLevel`` tokenizer over ``words`` (whitespace-split; ``<unk>`` for other words)."""
        tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(self.words)}, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens([PAD, UNK])
        return tok

    def draw(self, rng: random.Random, n: int) -> Example:
        """One instance of length ``n`` from ``rng`` (whatever its split)."""
        a, f = self.alphabet, self.first
        if self.name in ("copy", "reverse", "sort"):
            prompt = [f + rng.randrange(a) for _ in range(n)]
            answer = {"copy": prompt, "reverse": prompt[::-1], "sort": sorted(prompt)}[self.name]
        elif self.name == "addition":  # digits most significant first, then reversed with lsd_first
            da, db = [rng.randrange(a) for _ in range(n)], [rng.randrange(a) for _ in range(n)]
            total = sum((x + y) * a ** (n - 1 - k) for k, (x, y) in enumerate(zip(da, db)))
            ds = [(total // a**k) % a for k in range(n, -1, -1)]  # n + 1 digits, leading zero kept
            order = -1 if self.lsd_first else 1
            prompt = [f + d for d in da[::order]] + [f + a] + [f + d for d in db[::order]]  # f + a: "+"
            answer = [f + d for d in ds[::order]]
        elif self.name == "recall":
            keys = rng.sample(range(a), n)
            values = [rng.randrange(a) for _ in range(n)]
            q = rng.randrange(n)
            prompt = [t for k, v in zip(keys, values) for t in (f + k, f + a + v)] + [f + keys[q]]
            answer = [f + a + values[q]]
        else:  # passkey: ids f..f+9 digits, f+10 "key", f+11.. filler
            filler = [f + 11 + rng.randrange(a) for _ in range(n)]
            answer = [f + rng.randrange(10) for _ in range(self.passkey_digits)]
            at = rng.randrange(n + 1)
            prompt = filler[:at] + [f + 10] + answer + filler[at:]
        return Example(n, (*prompt, SEP_ID), (*answer, END_ID))

    def sample(self, rng: random.Random, n: int, evaluation: bool) -> Example:
        """An instance of length ``n`` of the evaluation split (``held_out``) or the training split. Raises ValueError
        when ``_MAX_TRIES`` draws find none (a tiny instance space at this length)."""
        for _ in range(_MAX_TRIES):
            ex = self.draw(rng, n)
            if held_out(ex.prompt) == evaluation:
                return ex
        raise ValueError(f"data: task {self.name} has no {'evaluation' if evaluation else 'training'} instance of "
                         f"length {n} in {_MAX_TRIES} draws (too few distinct instances): raise data.min_length or "
                         "data.alphabet")


def collate(examples: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples -> ``(x, y)`` int64 ``(B, T)``, ``T`` = the longest example minus one.

    Row ``b``: ``x[b, t] = tokens[t]`` (``<pad>`` past the example), ``y[b, t] = tokens[t + 1]``
    where that is an answer token (end token included), ``-1`` elsewhere: the model's
    ``cross_entropy(ignore_index=-1)`` counts answer tokens only.
    """
    x = [torch.tensor(ex.tokens[:-1], dtype=torch.int64) for ex in examples]
    y = [torch.tensor((-1,) * (len(ex.prompt) - 1) + ex.answer, dtype=torch.int64) for ex in examples]
    return pad_sequence(x, batch_first=True, padding_value=PAD_ID), pad_sequence(y, batch_first=True, padding_value=-1)


class TaskBatches(Dataset):
    """Training batches indexed by step: ``self[s]`` is ``collate`` of ``batch_size`` examples drawn from
    ``random.Random(step_seed(seed, s, rank))``: per row a length uniform in ``[min_length, max_length]`` and a
    training instance of it, or (with a fixed training ``pool``) a pool index. Raises IndexError for a negative step.
    """

    def __init__(self, task: Task, min_length: int, max_length: int, batch_size: int, seed: int = 0,
                 rank: int = 0, pool: Sequence[Example] | None = None) -> None:
        self.task, self.min_length, self.max_length = task, min_length, max_length
        self.batch_size, self.seed, self.rank, self.pool = batch_size, seed, rank, pool

    def examples(self, step: int) -> list[Example]:
        """The ``batch_size`` examples of batch ``step``."""
        rng = random.Random(step_seed(self.seed, step, self.rank))
        if self.pool is not None:
            return [self.pool[rng.randrange(len(self.pool))] for _ in range(self.batch_size)]
        return [self.task.sample(rng, rng.randint(self.min_length, self.max_length), evaluation=False)
                for _ in range(self.batch_size)]

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step < 0:
            raise IndexError(f"step {step} < 0")
        return collate(self.examples(step))


def default_eval_lengths(max_length: int) -> list[int]:
    """``1x, 1.5x, 2x, 4x`` the longest training length (``1.5x`` rounded down), without repeats."""
    return sorted({max_length, (3 * max_length) // 2, 2 * max_length, 4 * max_length})


class TaskDataModule(StepDataModule):
    """A synthetic task as a LightningDataModule: the keys of ``configs/data/<task>.yaml`` (each documented there)
    and from the pipeline ``block_size`` (``model.block_size``: a whole example of the longest length must fit),
    ``seed``, ``max_steps`` (default ``trainer.max_steps``) and ``cache_dir``, unused (nothing is cached). Raises
    ValueError (one line naming the ``data.<key>`` and the fix) for an unknown task, a length or count that is not a
    positive integer, ``max_length < min_length``, an alphabet too small (recall's keys are distinct: ``alphabet >=``
    the longest length), an option of another task, or an example longer than ``block_size``.
    """

    collate = staticmethod(collate)  # evaluation batches (validation, test, lengthgen) are teacher-forced examples

    def __init__(self, task: str, min_length: int = 1, max_length: int = 8, eval_lengths: Sequence[int] | None = None,
                 alphabet: int | None = None, lsd_first: bool = False, passkey_digits: int | None = None,
                 train_examples: int | None = None, batch_size: int = 64, eval_examples: int = 64,
                 val_examples: int = 256, eval_batch_size: int | None = None, eval_seed: int = 1234,
                 block_size: int = 128, seed: int = 0, cache_dir: str | None = None, max_steps: int | None = None,
                 num_workers: int = 0) -> None:
        super().__init__(batch_size, eval_batch_size, block_size, seed, max_steps, num_workers)
        self.task = Task(task, alphabet, bool(lsd_first), passkey_digits or DEFAULT_PASSKEY_DIGITS)
        for key, value in (("min_length", min_length), ("max_length", max_length), ("eval_examples", eval_examples),
                           ("val_examples", val_examples)):
            check_int(key, value)
        check_int("train_examples", train_examples, null=", or null")
        if max_length < min_length:
            raise ValueError(f"data.max_length={max_length} is below data.min_length={min_length}: "
                             "give max_length >= min_length")
        if lsd_first and task != "addition":
            raise ValueError(f"data.lsd_first applies to task=addition only, not {task}: remove it")
        if passkey_digits is not None and task != "passkey":
            raise ValueError(f"data.passkey_digits applies to task=passkey only, not {task}: remove it")
        check_int("passkey_digits", passkey_digits, null=", or null")
        eval_lengths = default_eval_lengths(max_length) if eval_lengths is None else _plain(eval_lengths)
        if not isinstance(eval_lengths, list) or not eval_lengths:
            raise ValueError(f"data.eval_lengths={eval_lengths!r}: give a list of lengths, "
                             "or null for 1x-4x max_length")
        for n in eval_lengths:
            check_int("eval_lengths", n)
        longest = max(max_length, *eval_lengths)
        if task == "recall" and self.task.alphabet < longest:
            raise ValueError(f"data.alphabet={self.task.alphabet} is too small for task recall at length {longest} "
                             f"(keys are distinct): give data.alphabet >= {longest}")
        tokens = self.task.n_tokens(longest)
        if tokens > block_size:
            key = "data.eval_lengths" if longest in eval_lengths else "data.max_length"
            raise ValueError(f"{key}: an example of length {longest} of task {task} has {tokens} tokens, more than "
                             f"model.block_size={block_size}: raise model.block_size or shorten {key}")
        self.min_length, self.max_length, self.eval_lengths = min_length, max_length, sorted(set(eval_lengths))
        self.train_examples, self.eval_examples, self.val_examples = train_examples, eval_examples, val_examples
        self.eval_seed = eval_seed
        self.pool: list[Example] | None = None

    def _mixed_set(self, stream: str) -> list[Example]:
        """``val_examples`` held-out examples, lengths uniform in the training range (but for lengths without any)."""
        rng = random.Random(step_seed(self.eval_seed, 0, _STREAMS[stream]))
        lengths = list(range(self.min_length, self.max_length + 1))
        out: list[Example] = []
        while len(out) < self.val_examples:
            n = rng.choice(lengths)
            try:
                out.append(self.task.sample(rng, n, evaluation=True))
            except ValueError:  # a short length whose few instances all train: leave it out
                lengths.remove(n)
                if not lengths:
                    raise
        return out

    def lengthgen_examples(self) -> list[Example]:
        """``eval_examples`` held-out examples at each of ``eval_lengths`` (the same for every run)."""
        self._require_setup()
        return self.splits["lengthgen"]

    def setup(self, stage: str | None = None) -> None:
        """Build the evaluation sets, the fixed training set (with ``train_examples``) and the tokenizer; idempotent.
        Raises ValueError for a length with no instance of the split it needs (``Task.sample``)."""
        if self.tokenizer is not None:
            return
        self.splits = {"validation": self._mixed_set("validation"), "test": self._mixed_set("test"), "lengthgen": []}
        for n in self.eval_lengths:
            rng = random.Random(step_seed(self.eval_seed, n, _STREAMS["lengthgen"]))
            self.splits["lengthgen"] += [self.task.sample(rng, n, evaluation=True) for _ in range(self.eval_examples)]
        if self.train_examples is not None:  # a fixed training set: step 0 of the stream "pool", one large batch
            self.pool = TaskBatches(self.task, self.min_length, self.max_length, self.train_examples, self.seed,
                                    _STREAMS["pool"]).examples(0)
        self.tokenizer = self.task.tokenizer()

    def train_batches(self) -> TaskBatches:
        """The step-indexed training batches of this rank."""
        self._require_setup()
        return TaskBatches(self.task, self.min_length, self.max_length, self.batch_size, self.seed, self._rank(),
                           self.pool)

    def state_dict(self) -> dict[str, Any]:
        """The tokenizer's JSON, the seed and the batch size (``load_state_dict`` compares them)."""
        return {**super().state_dict(), "seed": self.seed, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Warn when a checkpoint's seed or batch size differs from this datamodule's (batches will differ)."""
        changed = [k for k in ("seed", "batch_size") if k in state and state[k] != getattr(self, k)]
        if changed:
            rank_zero_warn(f"resuming with different data settings {changed}: batches differ from the original run")
