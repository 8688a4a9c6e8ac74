"""The config schema, one typed tree: ``configs/train.yaml`` starts from :class:`TrainConfig` (``train_schema`` in
Hydra's ConfigStore), so Hydra checks types and refuses unknown keys while it composes; each dataclass's
``__post_init__`` checks ranges when :func:`validate` builds the objects, before any data is read, and raises
``ValueError`` naming the key and the fix. Groups that build objects (``pos``, ``data``, ``trainer``, ``logger``,
``callbacks``) name a ``_target_``; their options are checked by the target's constructor.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import MISSING, DictConfig, OmegaConf

from dynpos.data.corpora import SPLITS
from dynpos.data.tokenizer import check_tokenizer_config
from dynpos.evaluation.extrapolate import PROTOCOLS, window_plan
from dynpos.model.attention import check_attn
from dynpos.model.gpt import GPTConfig
from dynpos.positional.base import PositionalScheme


def _whole(key: str, value: Any, minimum: int, null: bool = False) -> None:
    if not (null and value is None) and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{key}={value!r}: give a whole number >= {minimum}{' or null' if null else ''}")


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (``optim.*``, each key documented in ``configs/train.yaml``); a
    value out of range raises ``ValueError`` naming the ``optim.<key>``."""

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
    """Train short, test long (``eval.*``, each key documented in ``configs/train.yaml``): scored after training
    when ``lengths`` is set; a bad value raises ``ValueError`` naming the ``eval.<key>`` and the fix."""

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
        _whole("eval.max_tokens", self.max_tokens, 1, null=True)
        _whole("eval.batch_size", self.batch_size, 1)


@dataclass
class TokenizerConfig:
    """The tokenizer (``tokenizer.*``): ``kind`` (``configs/tokenizer/<kind>.yaml``), ``vocab_size`` (bpe only;
    None = 4096), ``max_train_chars`` read by a char/bpe tokenizer (None = all); a bad value raises ``ValueError``
    naming the ``tokenizer.<key>`` and the fix."""

    kind: str = "char"
    vocab_size: int | None = None
    max_train_chars: int | None = None

    def __post_init__(self) -> None:
        check_tokenizer_config(self.kind, self.vocab_size)
        _whole("tokenizer.max_train_chars", self.max_train_chars, 1, null=True)


@dataclass
class TrainConfig:
    """The whole training config: ``configs/train.yaml``, which documents the run-level keys, and its groups. A
    negative seed, an unknown ``resume``, or both ``resume`` and ``ckpt_path`` raise ``ValueError``."""

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
    """``scripts/sample.py``'s keys (``configs/sample.yaml``; :meth:`dynpos.model.gpt.GPT.generate` checks the
    sampling settings); ``num_samples`` < 1 raises ``ValueError``."""

    ckpt: str = MISSING
    prompt: str = "\n"
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = None
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _whole("num_samples", self.num_samples, 1)


@dataclass
class EvaluateConfig:
    """``scripts/evaluate.py``'s keys (``configs/evaluate.yaml``: checkpoint, output folder, attention path and
    ``eval`` as in training); an unknown ``attn`` raises ``ValueError``."""

    ckpt: str = MISSING
    out: str | None = None
    attn: str | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.attn is not None:
            check_attn(self.attn, key="attn")


def register() -> None:
    """Store the schemas in Hydra's ConfigStore: ``train_schema``, ``sample_schema``, ``evaluate_schema``."""
    for name, node in (("train_schema", TrainConfig), ("sample_schema", SampleConfig),
                       ("evaluate_schema", EvaluateConfig)):
        ConfigStore.instance().store(name=name, node=node)


# Keys that moved in the one-schema rework: named in the error, with their new place.
MOVED = {"batch_size": "data.batch_size", "val_windows": "data.val_windows"}


def check_keys(cfg: DictConfig) -> None:
    """Refuse keys outside the schema that Hydra let in (``+optim.lrr=1`` adds a key that Hydra's own check would
    have refused without the ``+``) and ``pos`` keys that are not options of the scheme's class.

    Raises:
        ValueError: naming the key, the closest known key and where a moved key went; or the scheme's options.
    """
    for group, schema in (("", TrainConfig), ("model", GPTConfig), ("optim", OptimConfig), ("eval", EvalConfig),
                          ("tokenizer", TokenizerConfig)):
        known, prefix = [f.name for f in fields(schema)], f"{group}." if group else ""
        for key in (f"{prefix}{k}" for k in (cfg[group] if group else cfg) if k not in known):
            if key in MOVED:
                raise ValueError(f"{key} moved to {MOVED[key]}: pass {MOVED[key]}=<value>")
            close = difflib.get_close_matches(key.removeprefix(prefix), known, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            raise ValueError(f"{key} is not a config key: {hint}(the keys of {group or 'the root'}: "
                             f"{', '.join(known)})")
    scheme = get_class(cfg.pos._target_)
    if not (isinstance(scheme, type) and issubclass(scheme, PositionalScheme)):
        raise ValueError(f"pos._target_={cfg.pos._target_} is not a positional scheme: name a subclass of "
                         "dynpos.positional.base.PositionalScheme (configs/pos/*.yaml)")
    options = scheme.options()
    for key in cfg.pos:
        if not str(key).startswith("_") and key not in options:
            raise ValueError(f"pos.{key} is not an option of {scheme.__name__}: its options are "
                             f"{', '.join(options) or 'none'}")


def validate(cfg: DictConfig) -> Any:
    """The composed config as its schema's object, with every range checked; for a training config also its keys
    (:func:`check_keys`) and ``trainer.max_steps``. A bad value raises ``ValueError`` naming the key and the fix,
    e.g. a missing ``ckpt``.
    """
    if OmegaConf.get_type(cfg) is TrainConfig:  # first: optim.decay_steps interpolates trainer.max_steps
        check_keys(cfg)
        _whole("trainer.max_steps", OmegaConf.select(cfg, "trainer.max_steps", throw_on_resolution_failure=False), 1)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"{missing[0]} is required: pass {missing[0]}=<value>")
    return OmegaConf.to_object(cfg)
