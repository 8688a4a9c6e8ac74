"""Tokenizers, all ``tokenizers.Tokenizer`` objects, so one JSON file saves any of them.

Kinds (``TOKENIZER_KINDS``, the ``tokenizer.kind`` config key):

- ``char``: one token per Unicode character seen in the training split, plus ``<unk>`` (id 0) for
  the rest; ids follow code point order. Decoding concatenates, so text round-trips exactly
  (``<unk>`` decodes as the five characters ``<unk>``).
- ``byte``: the 256 bytes, token id = byte value (byte-level BPE without merges, GPT-2's byte to
  character map); any UTF-8 text round-trips exactly.
- ``bpe``: byte-level BPE trained on the training split with ``tokenizers``' trainer, GPT-2's
  pre-tokenizer regex, no added prefix space; ``vocab_size`` (default 4096) counts the 256 bytes.
- ``gpt2``: GPT-2's pretrained tokenizer from the Hugging Face hub (needs the hub or its cache).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dynpos.atomic import write_text
from dynpos.data.corpora import HubUnavailableError

TOKENIZER_KINDS = ("char", "byte", "bpe", "gpt2")


def _byte_level(model: models.Model, use_regex: bool) -> Tokenizer:
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    return tok


def check_tokenizer_config(kind: str, vocab_size: int | None = None) -> None:
    """Validate ``tokenizer.kind`` and ``tokenizer.vocab_size`` (for ``dynpos.config.TokenizerConfig``). Raises
    ValueError for an unknown kind, or a ``vocab_size`` given for a kind other than ``bpe`` or not in [257, 2**32).
    """
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer.kind={kind!r}: choose one of {', '.join(TOKENIZER_KINDS)}")
    if vocab_size is None:
        return
    if kind != "bpe":
        raise ValueError(f"tokenizer.vocab_size={vocab_size} applies to tokenizer=bpe only: drop it for kind={kind}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 257 <= vocab_size < 2**32:
        raise ValueError(f"tokenizer.vocab_size={vocab_size!r}: give an integer of at least 257 (256 bytes + merges)")


def build_tokenizer(kind: str, train_texts: Iterable[str] = (), vocab_size: int | None = None) -> Tokenizer:
    """Build a tokenizer of ``kind`` (the kinds: ``dynpos.data.tokenizer``'s module docstring) that adds no special
    tokens; ``decode(encode(t).ids) == t`` for text its vocabulary covers. ``train_texts`` (the training split, read
    once) serve ``char`` and ``bpe``. Raises ValueError as ``check_tokenizer_config`` or for ``char`` with no
    training text, HubUnavailableError for ``gpt2`` when the hub cannot be reached and the cache lacks it.
    """
    check_tokenizer_config(kind, vocab_size)
    if kind == "char":
        chars = set(itertools.chain.from_iterable(train_texts))  # streamed: the texts need not fit in memory
        if not chars:
            raise ValueError("tokenizer=char found no characters in the training split: check data.*")
        # A BPE model without merges and without pre-tokenizer splits text into single characters;
        # measured 1.5x faster than WordLevel behind a one-character pre-tokenizer.
        vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(sorted(chars))}}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tok.decoder = decoders.Fuse()
        return tok
    if kind == "byte":  # no merges, so the GPT-2 regex split would change nothing but cost 2.5x the time
        # GPT-2's byte -> character map: printable Latin-1 bytes stand for themselves, the other 68 take 256, 257...
        keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
        extra = iter(range(256, 512))
        vocab = {chr(b if b in keep else next(extra)): b for b in range(256)}
        return _byte_level(models.BPE(vocab=vocab, merges=[]), use_regex=False)
    if kind == "bpe":
        tok = _byte_level(models.BPE(), use_regex=True)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size or 4096, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(train_texts, trainer)
        return tok
    try:
        return Tokenizer.from_pretrained("gpt2")
    except Exception as e:  # offline, or the hub refused: one line that says what to do
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise HubUnavailableError(f"tokenizer.kind=gpt2 needs the Hugging Face hub (Tokenizer.from_pretrained('gpt2') "
                                  f"failed: {type(e).__name__}: {reason}): connect once to fill the cache, or use "
                                  "tokenizer=char, byte or bpe") from e


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write ``tok`` as ``tokenizer.json`` text to ``path`` (parent folders are created; atomic)."""
    write_text(path, tok.to_str())


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer saved by ``save_tokenizer`` (any ``tokenizer.json``). Raises FileNotFoundError when there is
    no file at ``path``, ValueError when it is not a tokenizer JSON."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer file at {path!r}: point it at a run's tokenizer.json")
    try:
        return Tokenizer.from_file(path)
    except Exception as e:
        raise ValueError(f"{path!r} is not a tokenizer.json ({type(e).__name__}: {e})") from None


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """SHA-256 hex digest of the tokenizer's JSON with sorted keys: equal for equal tokenizers,
    so it keys token caches and checks that a checkpoint's tokenizer matches the data."""
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
