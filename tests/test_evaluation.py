"""Train short, test long (dynpos.evaluation.extrapolate, scripts/evaluate.py) and sweep reports
(dynpos.evaluation.report, scripts/report.py)."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dynpos import GPT, GPTConfig
from dynpos.evaluation.extrapolate import (evaluate_lengths, run_extrapolation, window_plan, windowed_loss,
                                            write_csv)
from dynpos.evaluation.report import compare, length_changes, load_sweep, pairs, summarize, write_report
from dynpos.positional import DPB, ALiBi, Learned, NoPE

from conftest import ROOT, run_main

PNG = b"\x89PNG\r\n\x1a\n"


def scored_targets(plan, length):
    """The target indices a plan scores: window (s, k) scores targets s + length - k + 1 .. s + length."""
    return [t for s, k in plan for t in range(s + length - k + 1, s + length + 1)]


# ----------------------------------------------------------------------------- window_plan


@pytest.mark.parametrize("protocol", ["nonoverlap", "sliding"])
@pytest.mark.parametrize("n, length, stride", [(10, 4, None), (10, 4, 1), (10, 4, 3), (10, 4, 4), (64, 8, 5),
                                               (7, 7, None), (100, 1, None), (33, 16, 16)])
def test_window_plan_scores_every_target_exactly_once(protocol, n, length, stride):
    plan = window_plan(n, length, protocol, stride)
    targets = scored_targets(plan, length)
    assert targets == list(range(1, len(targets) + 1))  # each of 1..m once, in order
    assert all(s + length <= n for s, _ in plan)  # no window runs past the text
    m = len(targets)
    step = length if protocol == "nonoverlap" else (stride or max(1, length // 2))
    assert n - m < step  # at most one step's worth of text is left unscored
    if protocol == "sliding":  # every scored target after the first window sees >= length - stride context
        assert all(k == step for _, k in plan[1:])


def test_window_plan_small_cases_by_hand():
    assert window_plan(10, 4, "nonoverlap") == [(0, 4), (4, 4)]
    # Windows 0..4, 2..6, 4..8, 6..10: the first scores targets 1-4, each later one its last 2.
    assert window_plan(10, 4, "sliding", 2) == [(0, 4), (2, 2), (4, 2), (6, 2)]
    assert window_plan(10, 4, "sliding") == window_plan(10, 4, "sliding", 2)  # default stride: length // 2
    assert window_plan(12, 4, "sliding", 4) == window_plan(12, 4, "nonoverlap")
    assert window_plan(3, 4, "nonoverlap") == [] and window_plan(3, 4, "sliding") == []


@pytest.mark.parametrize("args, fragment", [
    ((10, 0, "nonoverlap"), "must be positive"),
    ((10, 4, "chunked"), "eval.protocol='chunked'"),
    ((10, 4, "sliding", 5), "eval.stride=5 must be in 1..4"),
    ((10, 4, "sliding", 0), "eval.stride=0 must be in 1..4"),  # 0 is an error, not "the default"
])
def test_window_plan_refuses_bad_settings(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        window_plan(*args)


# ----------------------------------------------------------------------------- closed-form losses


class PositionLoss(nn.Module):
    """A model whose loss is known in closed form: on a text of zeros, the target at position ``p``
    of a window (0-based) costs exactly ``0.1 * (p + 1)`` nats, whatever the window's start.

    Logits ``(0, z)`` over two tokens with ``z = log(exp(l) - 1)`` give ``-log softmax[0] = log(1 + e^z) = l``.
    """

    def __init__(self, max_length=None):
        super().__init__()
        self.pos = SimpleNamespace(name="stub", max_length=max_length)

    def forward(self, x):
        b, t = x.shape
        z = torch.log(torch.expm1(0.1 * (torch.arange(t, dtype=torch.float64) + 1)))
        logits = torch.zeros(b, t, 2, dtype=torch.float64)
        logits[..., 1] = z
        return logits, None


def test_losses_match_the_closed_form_for_both_protocols():
    tokens = np.zeros(17, dtype=np.uint16)  # 16 targets
    rows = evaluate_lengths(PositionLoss(), tokens, [4, 16], protocol="nonoverlap", bytes_per_token=2.0)
    # nonoverlap, length L: every position 0..L-1 once per window -> mean 0.1 (L + 1) / 2.
    assert rows[0]["loss"] == pytest.approx(0.25) and rows[0]["tokens"] == 16
    assert rows[1]["loss"] == pytest.approx(0.85) and rows[1]["tokens"] == 16
    assert rows[0]["bpb"] == pytest.approx(0.25 / math.log(2) / 2.0)
    assert rows[0]["ppl"] == pytest.approx(math.exp(0.25))
    rows = evaluate_lengths(PositionLoss(), tokens, [4], protocol="sliding", stride=2, batch_size=3)
    # First window: positions 0-3 (0.1+0.2+0.3+0.4); six more (starts 2..12): positions 2, 3 each.
    assert rows[0]["loss"] == pytest.approx((1.0 + 6 * 0.7) / 16) and rows[0]["tokens"] == 16
    assert rows[0]["stride"] == 2
    assert evaluate_lengths(PositionLoss(), tokens, [4], protocol="sliding")[0]["stride"] == 2  # the default used


@pytest.mark.parametrize("scheme", [DPB, ALiBi, NoPE])
def test_a_model_with_zero_weights_scores_log_vocab_at_every_length(scheme):
    # All weights zero -> all logits zero -> uniform prediction: loss ln(V) exactly, even at 4x block_size.
    vocab = 11
    model = GPT(GPTConfig(vocab_size=vocab, block_size=8, n_layer=1, n_head=2, n_embd=16), pos=scheme)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    tokens = np.random.default_rng(0).integers(0, vocab, 65).astype(np.uint16)
    for protocol in ("nonoverlap", "sliding"):
        rows = evaluate_lengths(model, tokens, [8, 32], protocol=protocol, stride=4)
        assert [r["loss"] for r in rows] == pytest.approx([math.log(vocab)] * 2, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8])
def test_windowed_loss_takes_any_integer_token_dtype(dtype):
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    tokens, plan = torch.arange(65) % 11, window_plan(64, 8, "sliding", 4)
    assert windowed_loss(model, tokens.to(dtype), plan, 8, 3) == windowed_loss(model, tokens, plan, 8, 3)


def test_learned_positions_beyond_block_size_give_the_documented_n_a_row():
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16), pos=Learned)
    tokens = np.arange(65, dtype=np.uint16) % 11
    rows = evaluate_lengths(model, tokens, [8, 16], protocol="sliding", bytes_per_token=1.0)
    assert rows[0]["loss"] is not None and rows[0]["note"] == ""
    assert rows[1]["loss"] is None and rows[1]["bpb"] is None and rows[1]["tokens"] == 0
    assert rows[1]["note"] == "pos=learned encodes at most 8 positions"


def test_a_length_beyond_the_evaluated_text_is_refused():
    with pytest.raises(ValueError, match="raise eval.max_tokens"):
        evaluate_lengths(PositionLoss(), np.zeros(100, dtype=np.uint16), [64], max_tokens=32)


def test_run_extrapolation_writes_csv_and_png_for_both_protocols(tmp_path):
    rows = run_extrapolation(GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16)),
                             np.arange(200, dtype=np.uint16) % 11, 1.0, tmp_path / "eval",
                             lengths=[8, 16], protocol="both", max_tokens=64, split="validation")
    assert [(r["protocol"], r["length"]) for r in rows] == [("nonoverlap", 8), ("nonoverlap", 16),
                                                           ("sliding", 8), ("sliding", 16)]
    lines = (tmp_path / "eval" / "extrapolation.csv").read_text().splitlines()
    assert lines[0].startswith("length,protocol,stride,loss") and len(lines) == 5
    assert (tmp_path / "eval" / "extrapolation.png").read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------- scripts/evaluate.py


@pytest.fixture(scope="module")
def nano_checkpoint(tmp_path_factory, cache_dir):
    """A few steps of the real train() with the nano preset, evaluated after training at 1x and 2x."""
    from conftest import compose_cfg
    from dynpos.training.run import train

    out = tmp_path_factory.mktemp("nano") / "run"
    train(compose_cfg("model=nano", "trainer=debug", "trainer.max_steps=4", "trainer.val_check_interval=2",
                      "data.batch_size=8", "data.val_windows=4", "callbacks.sample.max_new_tokens=8",
                      "eval.lengths=[32,64]", "eval.max_tokens=512", output_dir=out, cache_dir=cache_dir))
    return out, cache_dir


def test_train_writes_the_extrapolation_rows_into_result_json(nano_checkpoint):
    run, _ = nano_checkpoint
    rows = json.loads((run / "result.json").read_text())["extrapolation"]
    assert [r["length"] for r in rows] == [32, 64] and all(r["loss"] > 0 for r in rows)
    assert (run / "eval" / "extrapolation.csv").is_file()


def test_evaluate_script_end_to_end_on_a_nano_checkpoint(nano_checkpoint, tmp_path, monkeypatch, capsys):
    run, cache = nano_checkpoint
    out = tmp_path / "eval"
    code, stdout, stderr = run_main(monkeypatch, capsys, "scripts/evaluate.py",
                                    f"ckpt={run / 'checkpoints' / 'best.ckpt'}", "eval.lengths=[32,128]",
                                    "eval.protocol=both", "eval.stride=16", "eval.max_tokens=1024", f"out={out}")
    assert code == 0, stderr[-2000:]
    rows = json.loads((out / "extrapolation.json").read_text())["rows"]
    assert [(r["protocol"], r["length"], r["stride"]) for r in rows] == [
        ("nonoverlap", 32, None), ("nonoverlap", 128, None), ("sliding", 32, 16), ("sliding", 128, 16)]
    assert all(r["loss"] > 0 and r["tokens"] > 0 and r["bpb"] > 0 for r in rows)
    assert (out / "extrapolation.csv").is_file() and (out / "extrapolation.png").read_bytes()[:8] == PNG
    assert "trained at 32 tokens" in stdout and "sliding" in stdout


def test_evaluate_script_bad_lengths_are_one_line(nano_checkpoint, tmp_path, monkeypatch, capsys):
    run, _ = nano_checkpoint
    code, out, err = run_main(monkeypatch, capsys, "scripts/evaluate.py",
                                    f"ckpt={run / 'checkpoints' / 'best.ckpt'}", "eval.lengths=[0]",
                                    f"out={tmp_path / 'eval'}")
    assert code == 2 and "Traceback" not in err
    assert err.startswith("error: eval.lengths=[0]") and err.count("\n") == 1


# ----------------------------------------------------------------------------- reports


def fake_run(root, num, pos, seed, test_loss, losses, lengths=(64, 128, 256), params=1000, overrides=None,
             max_steps=300, notes=None):
    """A run folder as `train.py -m` writes it (see dynpos.training.run.train), with a hand-made
    result.json: test and val loss ``test_loss``, test bpb ``test_loss / ln 2`` (1 byte per token)."""
    run = root / f"{num}_{pos}-micro-shakespeare_seed{seed}"
    (run / ".hydra").mkdir(parents=True)
    overrides = overrides or [f"pos={pos}"]
    (run / ".hydra" / "overrides.yaml").write_text(
        "".join(f"- {o}\n" for o in ["experiment=ablate_pos", *overrides, f"seed={seed}"]))
    rows = [{"length": n, "protocol": "nonoverlap", "stride": None, "loss": loss, "ppl": None, "bpb": None,
             "tokens": 0 if loss is None else 1024, "note": (notes or {}).get(n, "")}
            for n, loss in zip(lengths, losses)]
    result = {"metrics": {"test/loss": test_loss, "test/bpb": test_loss / math.log(2) / 1.0, "val/loss": test_loss},
              "num_params": params, "pos": pos, "extrapolation": rows,
              "config": {"seed": seed, "model": {"block_size": 64}, "trainer": {"max_steps": max_steps},
                         "pos": {"_target_": pos}, "run_name": f"{pos}-micro", "paths": {"output_dir": str(run)}}}
    (run / "result.json").write_text(json.dumps(result))
    return run


@pytest.fixture
def sweep(tmp_path):
    """dpb, alibi and learned, 3 seeds each: alibi ties dpb at 64 and 128 and is far worse at 256."""
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    num = 0
    table = {
        "dpb": ([1.9, 2.0, 2.1], [[1.9, 1.8, 1.81], [2.0, 1.92, 1.9], [2.1, 1.98, 1.99]], 1000),
        "alibi": ([1.95, 2.05, 2.15], [[1.95, 1.96, 2.49], [2.05, 1.95, 2.6], [2.15, 2.05, 2.71]], 900),
        "learned": ([2.2, 2.3, 2.4], [[2.2, None, None], [2.3, None, None], [2.4, None, None]], 1064),
    }
    for pos, (tests, curves, params) in table.items():
        for seed, (test, curve) in enumerate(zip(tests, curves)):
            notes = {128: "pos=learned encodes at most 64 positions", 256: "pos=learned encodes at most 64 positions"}
            fake_run(root, num, pos, seed, test, curve, params=params, notes=notes if pos == "learned" else None)
            num += 1
    return root


def test_report_means_stds_and_noise_verdicts_by_hand(sweep):
    runs, long = load_sweep(sweep)
    assert list(runs["label"]) == ["dpb"] * 3 + ["alibi"] * 3 + ["learned"] * 3
    assert len(long) == 9 * (3 + 3 * 2)  # per run: 3 metrics, 3 lengths x (loss, bpb)
    stats = summarize(long)
    assert list(stats.index.unique("column")) == ["test loss", "test bpb", "loss @64", "loss @128", "loss @256"]
    assert stats.loc[("dpb", "test loss"), "mean"] == pytest.approx(2.0)
    assert stats.loc[("dpb", "test loss"), "std"] == pytest.approx(0.1)
    assert stats.loc[("dpb", "loss @256"), "mean"] == pytest.approx(1.9) and stats.loc[("dpb", "loss @256"), "n"] == 3
    assert math.isnan(stats.loc[("learned", "loss @128"), "mean"]) and stats.loc[("learned", "loss @128"), "n"] == 0
    assert stats.loc[("learned", "loss @128"), "note"] == "pos=learned encodes at most 64 positions"
    verdicts = compare(stats, "dpb")
    tie = verdicts.loc[("alibi", "test loss")]  # d = 0.05, se = sqrt(0.01/3 + 0.01/3) = 0.0816
    assert tie["diff"] == pytest.approx(0.05) and tie["se"] == pytest.approx(math.sqrt(0.02 / 3)) and tie["noise"] is True
    far = verdicts.loc[("alibi", "loss @256")]  # d = 0.7, se = sqrt(0.11²/3 + 0.09²/3)
    assert far["diff"] == pytest.approx(0.7) and far["noise"] is False
    assert far["t"] == pytest.approx(0.7 / math.sqrt((0.11**2 + 0.09**2) / 3))
    assert verdicts.loc[("learned", "loss @128"), "noise"] is None and math.isnan(verdicts.loc[("learned", "loss @128"), "diff"])
    every = pairs(stats)
    assert len(every) == 3 * 5  # 3 pairs of schemes x 5 columns
    within = every[every["noise"].eq(True)]
    assert list(zip(within["label_b"], within.index)) == [
        ("dpb", ("alibi", c)) for c in ("test loss", "test bpb", "loss @64", "loss @128")]
    assert every.loc[("learned", "test loss"), "label_b"].tolist() == ["dpb", "alibi"]
    assert every.loc[("learned", "test loss"), "diff"].tolist() == pytest.approx([0.3, 0.25])


def test_length_changes_are_paired_by_seed(sweep):
    changes = length_changes(*load_sweep(sweep))
    assert set(changes.index) == {(label, f"loss @{n}") for label in ("dpb", "alibi", "learned") for n in (128, 256)}
    assert set(changes["ref"]) == {64}  # the training length
    dpb = changes.loc[("dpb", "loss @128")]  # per seed -0.10, -0.08, -0.12: mean -0.1, se 0.02 / sqrt(3)
    assert dpb["diff"] == pytest.approx(-0.1) and dpb["se"] == pytest.approx(0.02 / math.sqrt(3)) and dpb["noise"] is False
    alibi = changes.loc[("alibi", "loss @128")]  # per seed +0.01, -0.10, -0.10: |mean| < 2 se
    assert alibi["diff"] == pytest.approx(-0.19 / 3) and alibi["noise"] is True
    assert changes.loc[("alibi", "loss @256"), "diff"] == pytest.approx(0.55) and changes.loc[("alibi", "loss @256"), "noise"] is False
    assert math.isnan(changes.loc[("learned", "loss @128"), "diff"])


def test_report_writes_markdown_and_png(sweep):
    markdown, md, png = write_report(sweep)
    assert md == sweep / "report.md" and md.read_text() == markdown
    assert png == sweep / "report.png" and png.read_bytes()[:8] == PNG
    lines = markdown.splitlines()
    assert lines[0] == f"# Sweep report: {sweep}"
    table = lines[lines.index("| scheme | seeds | params | test loss | test bpb | loss @64 | loss @128 | loss @256 |"):][:5]
    assert table[1:] == [  # bpb = loss / ln 2; loss @128 of dpb: sd(1.8, 1.92, 1.98) = sqrt(0.0084)
        "|---|--:|--:|--:|--:|--:|--:|--:|",
        "| dpb | 3 | 1,000 | 2.0000 ± 0.1000 | 2.8854 ± 0.1443 | 2.0000 ± 0.1000 | 1.9000 ± 0.0917 | 1.9000 ± 0.0900 |",
        "| alibi | 3 | 900 | 2.0500 ± 0.1000 | 2.9575 ± 0.1443 | 2.0500 ± 0.1000 | 1.9867 ± 0.0551 | 2.6000 ± 0.1100 |",
        "| learned | 3 | 1,064 | 2.3000 ± 0.1000 | 3.3182 ± 0.1443 | 2.3000 ± 0.1000 | n/a | n/a |"]
    assert "n/a: pos=learned encodes at most 64 positions." in lines
    assert ("With 3 seeds a side a Welch t-test at 5% would need |t| of about 2.8–4.3, so treat |t| between 2 "
            "and 4.3 as suggestive.") in markdown
    differences = lines[lines.index("| scheme | test loss | loss @64 | loss @128 | loss @256 |"):][:4]
    assert differences[2:] == [
        f"| alibi | +0.0500 ≈ | +0.0500 ≈ | +0.0867 ≈ | **+0.7000** (t={0.7 / math.sqrt((0.11**2 + 0.09**2) / 3):+.1f}) |",
        "| learned | **+0.3000** (t=+3.7) | **+0.3000** (t=+3.7) | n/a | n/a |"]
    assert "- alibi: within noise of dpb: test loss, loss @64, loss @128; higher loss than dpb: loss @256" in lines
    assert "- learned: higher loss than dpb: everywhere" in lines  # both decidable columns
    assert "## Change with evaluation length" in lines and "minus the loss at 64 tokens" in markdown
    assert "| dpb | **-0.1000** (t=-8.7) | **-0.1000** (t=-17.3) |" in lines  # sd 0.02 and 0.01 over √3
    assert "- loss @128: dpb ≈ alibi" in lines and "- loss @256: none" in lines
    assert "## Notes" not in markdown  # a like-for-like sweep raises no caveat
    assert lines[-1] == "![loss against evaluation length: mean ± 1 std over 3 seeds](report.png)"
    assert "Differences from alibi" in write_report(sweep, baseline="alibi")[0]  # rewrites its own report
    with pytest.raises(ValueError, match="baseline='rope' is not a scheme of this sweep: choose one of dpb, alibi"):
        write_report(sweep, baseline="rope")


def test_a_one_seed_sweep_says_it_has_no_error_bars_and_flags_unfair_runs(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root, 0, "dpb", 0, 2.0, [2.0, 2.0, 2.0], overrides=["pos=dpb", "pos.log_distance=false"])
    fake_run(root, 1, "dpb", 0, 2.1, [2.1, 2.1, 2.1], overrides=["pos=dpb", "pos.log_distance=true"], max_steps=10)
    markdown, _, png = write_report(root)
    assert list(load_sweep(root)[0]["label"]) == ["dpb, pos.log_distance=false", "dpb, pos.log_distance=true"]
    assert "- the runs differ in trainer.max_steps: not a like-for-like comparison" in markdown
    assert "| dpb, pos.log_distance=true | 1 | 1,000 | 2.1000 | 3.0297 | 2.1000 | 2.1000 | 2.1000 |" in markdown
    assert "+0.1000 (1 seed)" in markdown  # one seed a side: a difference, no verdict
    assert "- loss @64: no verdict (fewer than two seeds)" in markdown
    assert "Every scheme ran 1 seed: no standard deviations, so no error bars and no noise verdicts" in markdown
    assert "Welch t-test" not in markdown and "3 seeds" not in markdown
    assert "![loss against evaluation length: 1 seed, no error bars](report.png)" in markdown
    assert png.read_bytes()[:8] == PNG


def test_sweeps_scored_with_other_protocols_join_into_one_row_per_scheme(tmp_path):
    root = tmp_path / "sweeps"
    fake_run(root / "a", 0, "dpb", 0, 2.0, [2.0, 1.9, 1.8], overrides=["pos=dpb"])
    fake_run(root / "b", 0, "rope", 0, 2.1, [2.1, 2.2, 2.4], overrides=["pos=rope", "eval.protocol=both"])
    fake_run(root / "b", 1, "dpb", 1, 2.2, [2.2, 2.0, 1.9], overrides=["pos=dpb", "eval.protocol=both"])
    assert list(load_sweep(root)[0]["label"]) == ["dpb", "rope", "dpb"]
    markdown = write_report(root)[0]
    assert "| dpb | 2 | 1,000 | 2.1000 ± 0.1414 |" in markdown and "not a like-for-like" not in markdown


def test_a_sweep_without_evaluation_lengths_still_gets_a_png(tmp_path):
    root = tmp_path / "sweep"
    fake_run(root, 0, "dpb", 0, 2.0, [], lengths=())
    fake_run(root, 1, "dpb", 1, 2.2, [], lengths=())
    fake_run(root, 2, "rope", 0, 2.3, [], lengths=())
    markdown, _, png = write_report(root)
    assert png == root / "report.png" and png.read_bytes()[:8] == PNG
    assert "| dpb | 2 | 1,000 | 2.1000 ± 0.1414 | 3.0297 ± 0.2040 |" in markdown
    assert "| rope | +0.2000 (1 seed) |" in markdown and "## Change with evaluation length" not in markdown
    assert ("With 2 seeds a side a Welch t-test at 5% would need |t| of about 4.3–12.7, so treat |t| between 2 and "
            "12.7 as suggestive. rope ran 1 seed: no error bars and no noise verdict for it.") in markdown
    assert markdown.endswith("![validation and test loss: mean ± 1 std over 1–2 seeds](report.png)\n")


def test_report_reads_evaluate_py_outputs_in_the_run_folders(tmp_path):
    """result.json scores 64 tokens; scripts/evaluate.py's CSVs add 512 (and repeat 64: equal, except
    one run whose repeat differs: result.json's value is kept and the report says so)."""
    root = tmp_path / "sweep"
    table = {("dpb", 0): (2.0, 2.0, 2.1), ("dpb", 1): (2.2, 2.2, 2.2),
             ("alibi", 0): (2.1, 2.1, 2.1), ("alibi", 1): (2.3, 2.35, 2.4)}  # loss@64 (result, csv), loss@512
    for num, ((pos, seed), (at64, csv64, at512)) in enumerate(table.items()):
        run = fake_run(root, num, pos, seed, 2.0, [at64], lengths=(64,))
        (run / "eval" / "ckpt-best").mkdir(parents=True)
        write_csv([{"length": n, "protocol": "nonoverlap", "stride": None, "loss": loss, "ppl": math.exp(loss),
                    "bpb": loss / math.log(2), "tokens": 4096, "note": ""} for n, loss in ((64, csv64), (512, at512))],
                  run / "eval" / "ckpt-best" / "extrapolation.csv")
    runs, long = load_sweep(root)
    stats = summarize(long)
    assert list(stats.index.unique("column")) == ["test loss", "test bpb", "loss @64", "loss @512"]
    assert stats.loc[("dpb", "loss @512"), "mean"] == pytest.approx(2.15)
    assert stats.loc[("alibi", "loss @64"), "mean"] == pytest.approx(2.2)  # 2.1 and result.json's 2.3
    assert stats.loc[("alibi", "loss @512"), "std"] == pytest.approx(0.3 / math.sqrt(2))
    bpb = long[(long["metric"] == "bpb") & (long["length"] == 512) & (long["label"] == "dpb")]["value"]
    assert list(bpb) == pytest.approx([2.1 / math.log(2), 2.2 / math.log(2)])  # the CSV's bpb fills result.json's blank
    changes = length_changes(runs, long)  # per seed +0.1, 0.0 for both: mean 0.05, se 0.05
    assert changes.loc[("alibi", "loss @512"), "diff"] == pytest.approx(0.05)
    assert changes.loc[("alibi", "loss @512"), "se"] == pytest.approx(0.05)
    assert changes.loc[("alibi", "loss @512"), "noise"] is True
    assert list(runs["disagree"]) == [0, 0, 0, 1]
    markdown, _, _ = write_report(root)
    assert ("- 3_alibi-micro-shakespeare_seed1: its evaluation files disagree on 1 score (another checkpoint or "
            "settings?)") in markdown
    # evaluate.py on the test split (its extrapolation.json says so): a column of its own
    out = root / "3_alibi-micro-shakespeare_seed1" / "eval" / "test-split"
    out.mkdir()
    write_csv([{"length": 512, "protocol": "nonoverlap", "loss": 2.5, "note": ""}], out / "extrapolation.csv")
    (out / "extrapolation.json").write_text(json.dumps({"split": "test", "rows": []}))
    stats = summarize(load_sweep(root)[1])
    assert list(stats.index.unique("column"))[2:] == ["loss @512 test", "loss @64 validation", "loss @512 validation"]
    assert stats.loc[("alibi", "loss @512 test"), "mean"] == 2.5 and stats.loc[("alibi", "loss @512 test"), "n"] == 1
    assert stats.loc[("alibi", "loss @512 validation"), "mean"] == pytest.approx(2.25)


def test_report_refuses_to_overwrite_another_sweeps_report(sweep, tmp_path):
    out = tmp_path / "reports"
    out.mkdir()
    (out / "report.md").write_text("# my notes\n")
    with pytest.raises(FileExistsError, match="out=.*reports already holds a report.md or report.png that is not"):
        write_report(sweep, out=out)
    assert (out / "report.md").read_text() == "# my notes\n" and not (out / "report.png").exists()
    (out / "report.md").unlink()
    _, md, png = write_report(sweep, out=out)
    assert md == out / "report.md" and png.is_file() and not (sweep / "report.md").exists()
    write_report(sweep, out=out)  # the same sweep's report is replaced


def test_a_file_instead_of_a_sweep_folder_names_the_fix():
    with pytest.raises(NotADirectoryError, match=r"sweep=.*README.md is a file, not a folder: pass the folder "
                                                 r"that `python train.py -m ...` wrote"):
        write_report(ROOT / "README.md")


def test_report_script_prints_and_writes_and_leaves_no_hydra_files(sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(monkeypatch, capsys, "scripts/report.py", str(sweep), "baseline=alibi")
    assert code == 0, err
    assert "| alibi | 3 | 900 |" in out and "## Differences from alibi" in out
    assert err == f"written: {sweep / 'report.md'}, {sweep / 'report.png'}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["multirun"]  # no outputs/, .hydra/ or log
    assert sorted(p.name for p in sweep.iterdir() if not p.is_dir()) == ["report.md", "report.png"]
    code, out, _ = run_main(monkeypatch, capsys, "scripts/report.py", "--help")
    assert code == 0 and "python scripts/report.py multirun/<date>_<time> baseline=alibi" in out and "sweep: ???" in out


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: None, lambda p: p.write_text("# notes\n")])
def test_report_script_on_a_folder_without_results_is_one_line(tmp_path, monkeypatch, capsys, make):
    folder = tmp_path / "README.md"  # an empty folder, a missing one, a file
    make(folder)
    code, _, err = run_main(monkeypatch, capsys, "scripts/report.py", str(folder))
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith("error: ") and str(folder) in err and "train.py -m" in err
    code, _, err = run_main(monkeypatch, capsys, "scripts/report.py")
    assert code == 2 and err.startswith("error: sweep is required: python scripts/report.py <multirun dir>")


def test_report_ranks_length_generalization_by_mean_reciprocal_rank(tmp_path):
    """Two tasks, two schemes, one seed each: a wins copy past length 8 (0.5 against 0.0) and b wins
    sort (0.25 against 0.0), so each has ranks 1 and 2: MRR (1 + 1/2) / 2 = 0.75 for both."""
    scores = {("copy", "a"): 0.5, ("copy", "b"): 0.0, ("sort", "a"): 0.0, ("sort", "b"): 0.25}
    for i, ((task, pos), beyond) in enumerate(scores.items()):
        run = tmp_path / f"{i}_{pos}-micro-{task}_seed0"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- data={task}\n- pos={pos}\n- seed=0\n")
        (run / "result.json").write_text(json.dumps({"metrics": {"val/loss": 1.0, "test/loss": 1.0},
                                                     "config": {"seed": 0, "model": {"block_size": 128}}}))
        (run / "lengthgen").mkdir()
        (run / "lengthgen" / "lengthgen.csv").write_text(
            "task,pos,train_max_length,length,n_tokens,examples,exact_match,token_accuracy,status\n"
            f"{task},{pos},8,8,18,64,1.0,1.0,ok\n{task},{pos},8,16,34,64,{beyond},{beyond},ok\n")
    markdown, _, _ = write_report(tmp_path)
    assert "| copy | a | 1 | 1.00 ± 0.00 | 0.50 ± 0.00 |" in markdown
    assert "copy: a 1, b 2; sort: b 1, a 2. Mean reciprocal rank: a 0.75, b 0.75." in markdown
    assert (tmp_path / "lengthgen_copy.png").read_bytes()[:8] == PNG and (tmp_path / "lengthgen_sort.png").is_file()
