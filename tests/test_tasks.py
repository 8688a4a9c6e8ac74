"""Length-generalization tasks and their scoring: literal instances, loss masking, disjoint splits,
resumable batches, one-line option errors, and exact scores for forced answers."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from torch import nn

from dynpos.data.tasks import (
    END_ID,
    PAD_ID,
    SEP_ID,
    TASKS,
    Example,
    Task,
    TaskBatches,
    TaskDataModule,
    collate,
    default_eval_lengths,
    held_out,
)
from dynpos.evaluation.lengthgen import greedy_decode, judge, metrics, score
from dynpos.evaluation.report import lengthgen_summary, rank_schemes
from dynpos.model.gpt import GPT, GPTConfig
from dynpos.positional import Learned


def make(task="copy", **options) -> TaskDataModule:
    options = {"min_length": 2, "max_length": 4, "block_size": 64, **options}
    dm = TaskDataModule(task, **options)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def text(dm: TaskDataModule, ex: Example) -> str:
    return dm.tokenizer.decode(list(ex.tokens))


# ------------------------------------------------------------------ generation


@pytest.mark.parametrize(
    ("task", "options", "expected"),
    [
        ("copy", {}, "b i e = b i e ."),
        ("reverse", {}, "b i e = e i b ."),
        ("sort", {}, "b i e = b e i ."),
        ("addition", {}, "1 8 4 + 0 6 6 = 0 2 5 0 ."),  # 184 + 066 = 0250
        ("addition", {"lsd_first": True}, "4 8 1 + 6 6 0 = 0 5 2 0 ."),  # the same sum, digits reversed
        ("recall", {"alphabet": 16}, "k4 v2 k5 v15 k12 v10 k5 = v15 ."),
        ("passkey", {}, "f1 f8 key 0 6 6 7 2 f4 = 0 6 6 7 2 ."),
    ],
)
def test_seed_gives_a_known_instance(task, options, expected):
    dm = make(task, **options)
    ex = dm.train_batches().examples(0)[0]  # seed 0, step 0, rank 0, first row
    assert text(dm, ex) == expected
    assert len(ex.tokens) == dm.task.n_tokens(ex.length)
    assert dm.tokenizer.encode(expected).ids == list(ex.tokens)


def test_copy_ids_and_vocabulary():
    dm = make("copy")
    ex = dm.train_batches().examples(0)[0]
    assert ex == Example(3, (5, 12, 8, SEP_ID), (5, 12, 8, END_ID))
    assert dm.vocab_size == dm.tokenizer.get_vocab_size() == 14  # <pad> <unk> = . and a..j
    assert dm.tokenizer.token_to_id("<pad>") == PAD_ID == 0
    assert dm.state_dict()["tokenizer"] == dm.tokenizer.to_str()
    assert dm.bytes_per_token == {}


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_right(task):
    """The answer follows from the prompt by the task's rule, for 200 random instances of each length."""
    t = Task(task, 16 if task == "recall" else 10, passkey_digits=3)
    rng = random.Random(7)
    for n in (1, 2, 5, 9):
        for _ in range(50):
            ex = t.draw(rng, n)
            x, y = [i - t.first for i in ex.prompt[:-1]], [i - t.first for i in ex.answer[:-1]]
            assert ex.prompt[-1] == SEP_ID and ex.answer[-1] == END_ID and len(ex.tokens) == t.n_tokens(n)
            if task == "copy":
                assert y == x
            elif task == "reverse":
                assert y == x[::-1]
            elif task == "sort":
                assert y == sorted(x)
            elif task == "addition":
                a, b = x[:n], x[n + 1:]
                assert x[n] == 10 and int("".join(map(str, a))) + int("".join(map(str, b))) == int("".join(map(str, y)))
            elif task == "recall":
                pairs = dict(zip(x[0:-1:2], x[1:-1:2]))
                assert len(pairs) == n and y == [pairs[x[-1]]]
            else:
                at = x.index(10)  # the "key" marker
                assert x[at + 1: at + 4] == y and len(x) == n + 4


def test_collate_masks_everything_but_the_answer():
    a = Example(1, (5, SEP_ID), (5, END_ID))
    b = Example(3, (5, 12, 8, SEP_ID), (8, 12, 5, END_ID))
    x, y = collate([a, b])
    assert x.dtype == y.dtype == torch.int64
    assert x.tolist() == [[5, SEP_ID, 5, PAD_ID, PAD_ID, PAD_ID, PAD_ID], [5, 12, 8, SEP_ID, 8, 12, 5]]
    assert y.tolist() == [[-1, 5, END_ID, -1, -1, -1, -1], [-1, -1, -1, 8, 12, 5, END_ID]]


def test_loss_counts_answer_tokens_only():
    """The model's loss on a batch equals the cross-entropy averaged over the answer tokens alone."""
    dm = make("reverse")
    x, y = dm.train_batches()[3]
    model = GPT(GPTConfig(vocab_size=dm.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))
    logits, loss = model(x, y)
    picked = []
    for b, ex in enumerate(dm.train_batches().examples(3)):
        p = len(ex.prompt)
        for k, target in enumerate(ex.answer):  # answer token k is predicted at position p - 1 + k
            picked.append(-torch.log_softmax(logits[b, p - 1 + k], -1)[target])
    assert int((y != -1).sum()) == len(picked)
    torch.testing.assert_close(loss, torch.stack(picked).mean())


def test_default_eval_lengths():
    assert default_eval_lengths(16) == [16, 24, 32, 64]
    assert default_eval_lengths(5) == [5, 7, 10, 20]
    assert default_eval_lengths(1) == [1, 2, 4]


# ------------------------------------------------------------------ splits and batches


@pytest.mark.parametrize("train_examples", [None, 50])
def test_training_and_evaluation_never_share_an_instance(train_examples):
    dm = make("copy", alphabet=3, min_length=2, max_length=5, eval_lengths=[5, 6], train_examples=train_examples)
    batches = dm.train_batches()
    train = {ex.prompt for s in range(30) for ex in batches.examples(s)}
    held = {ex.prompt for split in ("validation", "test", "lengthgen") for ex in dm.splits[split]}
    assert not any(held_out(p) for p in train)
    assert all(held_out(p) for p in held)
    assert train.isdisjoint(held)
    assert len(train) > 100 if train_examples is None else len(train) <= 50
    # length 5 appears in both sets (the 1x bucket), with different instances
    assert {len(p) - 1 for p in train} >= {5} and 5 in {ex.length for ex in dm.lengthgen_examples()}


def test_batches_are_a_function_of_seed_step_and_rank():
    dm = make("sort")
    one, two = dm.train_batches(), make("sort").train_batches()
    for a, b in zip(one[7], two[7]):
        assert torch.equal(a, b)
    other_rank = TaskBatches(dm.task, 2, 4, 64, seed=0, rank=1)
    other_seed = TaskBatches(dm.task, 2, 4, 64, seed=1, rank=0)
    assert not torch.equal(one[7][0][:, :5], one[8][0][:, :5])
    assert not torch.equal(one[7][0][:, :5], other_rank[7][0][:, :5])
    assert not torch.equal(one[7][0][:, :5], other_seed[7][0][:, :5])


def test_train_loader_starts_at_the_trainer_step():
    dm = make("copy", max_steps=None)
    dm.trainer = SimpleNamespace(global_step=5, accumulate_grad_batches=2, max_steps=8, global_rank=0)
    loader = dm.train_dataloader()
    got = list(loader)
    assert len(got) == 6 and len(loader.dataset) == 16  # steps 10 .. 15 of a 16-step epoch
    assert torch.equal(got[0][0], dm.train_batches()[10][0])


def test_evaluation_sets_do_not_depend_on_the_training_seed():
    a, b = make("passkey", seed=0), make("passkey", seed=5)
    assert a.lengthgen_examples() == b.lengthgen_examples()
    assert a.splits["validation"] == b.splits["validation"]
    assert len(a.lengthgen_examples()) == 64 * len(a.eval_lengths)
    x, y = next(iter(a.val_dataloader()))
    assert x.shape[0] == 64 and int((y != -1).sum(1).min()) == 6  # 5 digits and the end token


# ------------------------------------------------------------------ bad options


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"task": "copyy"}, "data.task"),
        ({"min_length": 5, "max_length": 4}, "data.max_length"),
        ({"min_length": 0}, "data.min_length"),
        ({"alphabet": 1}, "data.alphabet"),
        ({"task": "recall", "alphabet": 8}, "data.alphabet"),  # 4x max_length = 16 distinct keys
        ({"eval_lengths": [4, 40]}, "data.eval_lengths"),  # copy of 40: 82 tokens > block_size 64
        ({"max_length": 40, "eval_lengths": [4]}, "data.max_length"),
        ({"eval_lengths": []}, "data.eval_lengths"),
        ({"lsd_first": True}, "data.lsd_first"),
        ({"passkey_digits": 3}, "data.passkey_digits"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"train_examples": 0}, "data.train_examples"),
    ],
)
def test_bad_options_raise_one_line_errors(options, key):
    options = {"task": "copy", "min_length": 2, "max_length": 4, "block_size": 64, **options}
    with pytest.raises(ValueError, match=rf"^{key}\b") as err:
        TaskDataModule(**options)
    assert "\n" not in str(err.value)


def test_the_longest_evaluation_example_must_fit_the_block():
    TaskDataModule("copy", max_length=16, block_size=130)  # 4x = 64: 130 tokens
    with pytest.raises(ValueError, match=r"130 tokens, more than model.block_size=129"):
        TaskDataModule("copy", max_length=16, block_size=129)


# ------------------------------------------------------------------ scoring


class Oracle(nn.Module):
    """A fake GPT (same call signature) that answers each prompt from a table, with an optional
    ``mistake(k, token) -> token`` applied to answer position ``k``."""

    def __init__(self, examples, vocab_size, mistake=None, max_length=None):
        super().__init__()
        self.answers = {ex.prompt: ex.answer for ex in examples}
        self.config = SimpleNamespace(n_layer=1)
        self.pos = SimpleNamespace(max_length=max_length, name="oracle")
        self.vocab_size, self.mistake = vocab_size, mistake
        self.calls = 0

    def forward(self, idx, targets=None, cache=None):
        self.calls += 1
        k_new = idx[:, None, :, None].float()
        keys, _ = cache.append(0, k_new, k_new)
        seen = keys[:, 0, :, 0].long()  # every token so far: (B, j)
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.vocab_size)
        for b, row in enumerate(seen.tolist()):
            prompt = tuple(row[: row.index(SEP_ID) + 1])
            answer, k = self.answers[prompt], len(row) - len(prompt)
            token = answer[k] if k < len(answer) else END_ID
            if self.mistake is not None:
                token = self.mistake(k, token)
            logits[b, -1, token] = 1.0
        return logits, None


def test_forced_correct_answers_score_one():
    dm = make("copy", eval_lengths=[2, 4, 6], eval_examples=5)
    oracle = Oracle(dm.lengthgen_examples(), dm.vocab_size)
    rows = score(oracle, dm.lengthgen_examples(), batch_size=4)
    assert rows == [
        {"length": n, "n_tokens": 2 * n + 2, "examples": 5, "exact_match": 1.0, "token_accuracy": 1.0, "status": "ok"}
        for n in (2, 4, 6)
    ]
    assert metrics(rows)["lengthgen/exact@6"] == 1.0


def test_one_wrong_token_scores_zero_exact_and_the_right_fraction():
    dm = make("reverse", eval_lengths=[2, 4, 6], eval_examples=3)
    wrong = 13  # "j", never the decoy of itself below
    oracle = Oracle(dm.lengthgen_examples(), dm.vocab_size,
                    mistake=lambda k, t: (wrong if t != wrong else 12) if k == 1 else t)
    rows = score(oracle, dm.lengthgen_examples())
    assert [(r["exact_match"], r["token_accuracy"]) for r in rows] == [(0.0, 1 / 2), (0.0, 3 / 4), (0.0, 5 / 6)]


def test_an_early_end_token_stops_decoding_and_counts_the_rest_wrong():
    dm = make("copy", eval_lengths=[4], eval_examples=2)
    oracle = Oracle(dm.lengthgen_examples(), dm.vocab_size, mistake=lambda k, t: END_ID if k == 1 else t)
    (row,) = score(oracle, dm.lengthgen_examples())
    assert (row["exact_match"], row["token_accuracy"]) == (0.0, 1 / 4)
    assert oracle.calls == 2  # the prompt, then the first answer token; every row ended at k = 1


def test_judge():
    assert judge([5, 6, 3, 9], (5, 6, 3)) == (True, 1.0)  # tokens after the end token are ignored
    assert judge([5, 7, 3], (5, 6, 3)) == (False, 0.5)
    assert judge([5, 6, 6], (5, 6, 3)) == (False, 1.0)  # right digits, no end token
    assert judge([3, 5, 6], (5, 6, 3)) == (False, 0.0)
    assert judge([6, 5, 6], (5, 6, 3)) == (False, 0.0)  # shifted by one: no position matches
    assert judge([3], (3,)) == (True, 1.0)


def test_greedy_decoding_through_the_cache_matches_full_recomputation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=14, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    prompts = torch.randint(4, 14, (3, 5))
    fast = greedy_decode(model, prompts, 6, end_id=99)  # no end token: all 6 steps
    seq = prompts
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(fast, seq[:, 5:])


def test_a_scheme_that_cannot_encode_a_length_gets_an_na_row():
    dm = make("copy", eval_lengths=[4, 8], eval_examples=2)
    model = GPT(GPTConfig(vocab_size=dm.vocab_size, block_size=12, n_layer=1, n_head=2, n_embd=16), pos=Learned)
    rows = score(model, dm.lengthgen_examples())  # length 4 reads 9 tokens, length 8 reads 17 > 12
    assert [r["status"] for r in rows] == ["ok", "n/a"]
    assert rows[1]["exact_match"] is None and rows[1]["token_accuracy"] is None
    assert rows[0]["exact_match"] in (0.0, 0.5, 1.0)
    assert list(metrics(rows)) == ["lengthgen/exact@4", "lengthgen/token@4"]


def test_summary_and_mean_reciprocal_rank():
    rows = []
    for task, per_pos in {"copy": {"a": [1.0, 0.5], "b": [0.0, 0.2], "c": [1.0, 0.5]},
                          "sort": {"a": [0.1, 0.3], "b": [0.6, 0.4], "c": None}}.items():
        for pos, values in per_pos.items():
            for seed in range(2):
                rows.append({"task": task, "pos": pos, "length": 4, "status": "ok", "exact_match": 1.0})
                rows.append({"task": task, "pos": pos, "length": 8, "status": "n/a" if values is None else "ok",
                             "exact_match": None if values is None else values[seed]})
    summary = lengthgen_summary(pd.DataFrame(rows))
    copy_a8 = summary.loc[("copy", "a", 8)]
    assert copy_a8["exact_match"] == 0.75 and copy_a8["exact_match_std"] == pytest.approx(0.5 ** 0.5 / 2)
    assert copy_a8["runs"] == 2 and summary.loc[("copy", "a", 4), "exact_match_std"] == 0.0
    assert summary.loc[("sort", "c", 8)].isna()[["exact_match", "exact_match_std"]].all()  # an n/a run: n/a
    assert summary.loc[("sort", "c", 4), "exact_match"] == 1.0
    ranks, mrr = rank_schemes(summary, {"copy": 4, "sort": 4})
    assert ranks.to_dict() == {("copy", "a"): 1, ("copy", "b"): 3, ("copy", "c"): 1,
                               ("sort", "a"): 2, ("sort", "b"): 1, ("sort", "c"): 3}
    assert mrr.to_dict() == {"a": pytest.approx(0.75), "b": pytest.approx(2 / 3), "c": pytest.approx(2 / 3)}


@pytest.mark.parametrize("task", TASKS)
def test_data_config_builds_the_datamodule(task):
    """configs/data/<task>.yaml, instantiated as the pipeline does, fits model.block_size=128."""
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "data" / f"{task}.yaml")
    dm = instantiate(cfg, block_size=128, seed=3, cache_dir="/nonexistent", max_steps=10)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.task.name == task and dm.seed == 3 and dm.max_steps == 10
    assert dm.eval_lengths == default_eval_lengths(dm.max_length)
    assert dm.task.n_tokens(max(dm.eval_lengths)) <= 128


class _TinyLit:
    """A minimal LightningModule around a GPT (the pipeline's LitGPT is not needed here)."""

    @staticmethod
    def make(vocab_size: int):
        import lightning as L

        class Tiny(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = GPT(GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=16))

            def training_step(self, batch, batch_idx):
                return self.model(*batch)[1]

            def validation_step(self, batch, batch_idx):
                self.log("val/loss", self.model(*batch)[1])

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-3)

        return Tiny()


@pytest.mark.slow  # a real Trainer: about 5-10 s
def test_callback_scores_logs_and_writes_at_each_validation(tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from dynpos.evaluation.lengthgen import LengthGenEval

    dm = TaskDataModule("copy", min_length=2, max_length=4, block_size=64, batch_size=8, eval_examples=4,
                        val_examples=8, max_steps=4)
    callback = LengthGenEval()
    trainer = L.Trainer(max_steps=4, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0,
                        logger=CSVLogger(tmp_path), default_root_dir=tmp_path, callbacks=[callback],
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    module = _TinyLit.make(14)
    trainer.fit(module, datamodule=dm)
    assert [r["length"] for r in callback.rows] == [4, 6, 8, 16]
    assert {r["task"] for r in callback.rows} == {"copy"} and {r["pos"] for r in callback.rows} == {"dpb"}
    expected = score(module.model, dm.lengthgen_examples())  # the final weights, scored again
    assert [r["exact_match"] for r in callback.rows] == [r["exact_match"] for r in expected]
    assert float(trainer.callback_metrics["lengthgen/token@16"]) == pytest.approx(expected[-1]["token_accuracy"])
    assert (tmp_path / "lengthgen" / "lengthgen.csv").read_text().splitlines()[0].startswith("task,pos,")
    assert (tmp_path / "lengthgen" / "lengthgen.png").stat().st_size > 0
    callback.rows = None
    trainer.validate(module, datamodule=dm, verbose=False)  # as the pipeline scores the best checkpoint
    assert [r["exact_match"] for r in callback.rows] == [r["exact_match"] for r in expected]
    assert float(trainer.callback_metrics["lengthgen/exact@4"]) == expected[0]["exact_match"]


@pytest.mark.slow  # two real Trainer runs
def test_resumed_run_sees_the_same_batches(tmp_path):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch[0].clone())
            return self.w ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class SaveAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2 and not (tmp_path / "step2.ckpt").exists():
                trainer.save_checkpoint(tmp_path / "step2.ckpt")

    def trainer(callbacks=()):
        return L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         default_root_dir=tmp_path, callbacks=list(callbacks))

    full = Recorder()
    trainer([SaveAt()]).fit(full, datamodule=make("addition", batch_size=4))
    batches = make("addition", batch_size=4).train_batches()
    assert len(full.seen) == 5 and all(torch.equal(x, batches[i][0]) for i, x in enumerate(full.seen))
    resumed = Recorder()
    trainer().fit(resumed, datamodule=make("addition", batch_size=4), ckpt_path=tmp_path / "step2.ckpt")
    assert len(resumed.seen) == 3 and all(torch.equal(a, b) for a, b in zip(full.seen[2:], resumed.seen))
