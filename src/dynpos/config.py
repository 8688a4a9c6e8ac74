"""The config schema: one typed tree, checked once, at composition.

``configs/train.yaml`` starts from :class:`TrainConfig` (stored in Hydra's ConfigStore as
``train_schema`` by :func:`register`), so Hydra checks every key's type while it composes and
refuses unknown keys with its own message. Ranges are checked by each dataclass's
``__post_init__`` when :func:`validate` turns the composed config into objects, before any data
is read. Groups that build objects (``pos``, ``data``, ``trainer``, ``logger``, ``callbacks``)
name a ``_target_``; their options are the target's keyword arguments, checked where they enter:
the scheme's or datamodule's constructor (:func:`build_pos` refuses unknown ``pos`` keys).
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class, instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from dynpos.data.corpora import SPLITS
from dynpos.data.tokenizer import check_tokenizer_config
from dynpos.evaluation.extrapolate import PROTOCOLS, window_plan
from dynpos.model.gpt import GPTConfig


def _whole(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r}: give a whole number >= {minimum}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (``optim.*``).

    Attributes:
        lr: peak learning rate; min_lr: where the cosine ends; weight_decay: on >= 2-D weights;
        betas: AdamW's two betas in [0, 1); warmup_steps: linear warmup; decay_steps: the step
        where the cosine reaches ``min_lr`` (``${trainer.max_steps}`` in ``train.yaml``).

    Raises:
        ValueError: a value out of range; the message names the ``optim.<key>``.
    """

    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    warmup_steps: int = 100
    decay_steps: int = 1000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optim.lr must be > 0, got {self.lr} (a peak learning rate such as 1e-3)")
        for key in ("min_lr", "weight_decay"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ValueError(f"optim.{key} must be >= 0, got {getattr(self, key)}")
        _whole("optim.warmup_steps", self.warmup_steps, 0)
        _whole("optim.decay_steps", self.decay_steps, 0)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={list(self.betas)}: give two numbers in [0, 1), e.g. optim.betas=[0.9,0.99]")


@dataclass
class EvalConfig:
    """Train short, test long (``eval.*``): scored after training when ``lengths`` is set.

    Attributes:
        lengths: evaluation lengths in tokens; None = none. protocol: ``nonoverlap``, ``sliding``
        or ``both`` (ALiBi paper, section 4). stride: sliding step (None = length // 2).
        split: the split scored. max_tokens: targets scored per length (None = the whole split).
        batch_size: windows per batch.

    Raises:
        ValueError: naming the ``eval.<key>`` and the fix.
    """

    lengths: list[int] | None = None
    protocol: str = "nonoverlap"
    stride: int | None = None
    split: str = "validation"
    max_tokens: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.lengths is not None:
            if not self.lengths or any(n < 1 for n in self.lengths):
                raise ValueError(f"eval.lengths={list(self.lengths)}: give positive token counts, e.g. "
                                 "eval.lengths=[128,256]")
            if self.protocol != "both" and self.protocol not in PROTOCOLS:
                raise ValueError(f"eval.protocol={self.protocol!r}: choose one of {', '.join(PROTOCOLS)} or both")
            for name in PROTOCOLS if self.protocol == "both" else (self.protocol,):
                for length in self.lengths:
                    window_plan(0, length, name, self.stride)  # checks the stride against each length
        if self.split not in SPLITS:
            raise ValueError(f"eval.split={self.split!r}: choose one of {', '.join(SPLITS)}")
        if self.max_tokens is not None:
            _whole("eval.max_tokens", self.max_tokens, 1)
        _whole("eval.batch_size", self.batch_size, 1)


@dataclass
class TokenizerConfig:
    """The tokenizer (``tokenizer.*``; see :mod:`dynpos.data.tokenizer`).

    Attributes:
        kind: char, byte, bpe or gpt2. vocab_size: BPE only (None = 4096).
        max_train_chars: cap on the training text a char/bpe tokenizer reads (None = all).

    Raises:
        ValueError: naming the ``tokenizer.<key>`` and the fix.
    """

    kind: str = "char"
    vocab_size: int | None = None
    max_train_chars: int | None = None

    def __post_init__(self) -> None:
        check_tokenizer_config(self.kind, self.vocab_size)
        if self.max_train_chars is not None:
            _whole("tokenizer.max_train_chars", self.max_train_chars, 1)


@dataclass
class TrainConfig:
    """The whole training config (``configs/train.yaml`` and its groups).

    Run-level keys: ``seed`` (weights, dropout and the training-window rule), ``ckpt_path``
    (continue from a checkpoint), ``resume`` (``auto``: continue the run folder's last
    checkpoint), ``run_name`` and ``group`` (wandb), ``paths`` (run folder, cache).

    Raises:
        ValueError: a negative seed or an unknown ``resume``.
    """

    model: GPTConfig = field(default_factory=GPTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pos: Any = MISSING
    data: Any = MISSING
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = None
    paths: Any = MISSING
    seed: int = 0
    ckpt_path: str | None = None
    resume: str | None = None
    run_name: str = "run"
    group: str | None = None

    def __post_init__(self) -> None:
        _whole("seed", self.seed, 0)
        if self.resume not in (None, "auto"):
            raise ValueError(f"resume={self.resume!r}: use resume=auto (continue <run folder>/checkpoints/last.ckpt) "
                             "or ckpt_path=<file.ckpt>")
        if self.resume == "auto" and self.ckpt_path:
            raise ValueError(f"resume=auto and ckpt_path={self.ckpt_path} both given: pass one of them")


@dataclass
class SampleConfig:
    """``scripts/sample.py`` (``configs/sample.yaml``): generate from a checkpoint.

    Raises:
        ValueError: naming the key and the fix.
    """

    ckpt: str = MISSING
    prompt: str = "\n"
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = None
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _whole("max_new_tokens", self.max_new_tokens, 0)
        _whole("num_samples", self.num_samples, 1)
        if self.top_k is not None:
            _whole("top_k", self.top_k, 1)
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: give a number > 0 (a small one such as 1e-3 is greedy)")


@dataclass
class EvaluateConfig:
    """``scripts/evaluate.py`` (``configs/evaluate.yaml``): score a checkpoint at evaluation lengths.

    Attributes:
        ckpt: the checkpoint. out: the output folder (None = a new ``<run>/evaluate/<ckpt>-<time>``).
        attn: the attention path to score with (None = the checkpoint's). eval: as in training;
        ``eval.lengths`` None = 1x, 2x, 4x and 8x the model's training length.

    Raises:
        ValueError: naming the key and the fix.
    """

    ckpt: str = MISSING
    out: str | None = None
    attn: str | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.attn is not None:
            GPTConfig(attn=self.attn)  # the model's own check names model.attn and the choices


def register() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent): ``train_schema`` (:class:`TrainConfig`),
    ``sample_schema`` and ``evaluate_schema``, the first entries of the configs' defaults lists."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="sample_schema", node=SampleConfig)
    store.store(name="evaluate_schema", node=EvaluateConfig)


# Keys that moved in the one-schema rework: named in the error, with their new place.
MOVED = {"batch_size": "data.batch_size", "val_windows": "data.val_windows"}


def check_keys(cfg: DictConfig) -> None:
    """Refuse keys outside the schema that Hydra let in (``+optim.lrr=1`` adds a key Hydra's own
    check would have refused without the ``+``): a typo must not be silently ignored.

    Raises:
        ValueError: naming the key, the closest known key and where a moved key went.
    """
    for group, schema in (("", TrainConfig), ("model", GPTConfig), ("optim", OptimConfig), ("eval", EvalConfig),
                          ("tokenizer", TokenizerConfig)):
        known = [f.name for f in fields(schema)]
        for key in cfg[group] if group else cfg:
            if key in known:
                continue
            full = f"{group}.{key}" if group else str(key)
            if full in MOVED:
                raise ValueError(f"{full} moved to {MOVED[full]}: pass {MOVED[full]}=<value>")
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {group + '.' if group else ''}{close[0]}? " if close else ""
            raise ValueError(f"{full} is not a config key: {hint}(the keys of {group or 'the root'}: "
                             f"{', '.join(known)})")


def validate(cfg: DictConfig) -> TrainConfig:
    """Every key known (:func:`check_keys`), ``trainer.max_steps``, the range checks of every typed
    group (their ``__post_init__``), and ``pos``'s keys.

    Raises:
        ValueError: naming the key and the fix; omegaconf errors for a missing value (``???``).
    """
    check_keys(cfg)
    _whole("trainer.max_steps", OmegaConf.select(cfg, "trainer.max_steps", throw_on_resolution_failure=False), 1)
    typed = OmegaConf.to_object(cfg)
    build_pos(cfg.pos)
    return typed


def validate_script(cfg: DictConfig) -> Any:
    """A script's config as its schema's object (``SampleConfig``, ``EvaluateConfig``): the ranges checked.

    Raises:
        ValueError: naming the key and the fix, e.g. a missing ``ckpt``.
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"{missing[0]} is required: pass {missing[0]}=<value>")
    return OmegaConf.to_object(cfg)


def build_pos(pos: DictConfig | dict) -> Any:
    """The positional scheme factory of a ``pos`` config (``_target_`` with ``_partial_: true``).

    Raises:
        ValueError: a key that is not an option of the scheme (a typo such as ``pos.depthh``),
            naming the scheme's options.
    """
    pos = OmegaConf.create(pos) if isinstance(pos, dict) else pos
    target = get_class(pos._target_)
    options = [p for p in inspect.signature(target).parameters if p not in
               ("self", "n_layer", "n_head", "n_embd", "block_size")]
    for key in pos:
        if not str(key).startswith("_") and key not in options:
            raise ValueError(f"pos.{key} is not an option of {target.__name__}: its options are "
                             f"{', '.join(options) or 'none'}")
    return instantiate(pos)
