"""Reliability: exact resume, crash safety, non-finite loss, DDP, safe checkpoints, reproducibility.

Runs the real pipeline: in process (`train(cfg)` on the composed config, like tests/test_train.py)
where that suffices, and as `python train.py ...` subprocesses where the process itself matters
(SIGKILL, DDP). All runs use the nano model on a small corpus written into a temporary folder, one
CPU thread per process (so every run does the same float operations in the same order).
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONFIGS, ROOT
from conftest import compose_cfg as compose_train
from dynpos.atomic import atomic_path
from dynpos.data.datamodule import StepBatches
from dynpos.training.checkpoint import AtomicCheckpointIO, CheckpointError, load_checkpoint, read_checkpoint
from dynpos.training.cli import guard
from dynpos.training.module import LitGPT
from dynpos.training.run import train

STEPS = 8  # N; the resumed run stops at N/2 = 4
SECRET = "fake-wandb-key-0123456789abcdef0123456789abcdef"
# 8 steps, validation and checkpoints every 2 steps, dropout on (so resuming must restore the RNG
# stream too), a 4-token sample and no bias plot (time), the LR schedule fixed at N steps.
BASE = ["model=nano", "trainer=debug", "data=textfiles", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=2",
        f"optim.decay_steps={STEPS}", "optim.warmup_steps=2", "optim.lr=3e-3", "model.dropout=0.1", "data.batch_size=8",
        "callbacks.sample.max_new_tokens=4", "~callbacks.bias_plot", "~callbacks.progress_bar"]


def corpus_text(lines: int = 900) -> str:
    """About 50 kB of deterministic pseudo-English."""
    rng = random.Random(0)
    words = ("the king queen is dead long live and all her men who sing of love war night day sword crown "
             "speak hear me friend Rome ROMEO JULIET thou art my lord").split()
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))) for _ in range(lines)) + "\n"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with ``corpus.txt`` and a shared token cache."""
    folder = tmp_path_factory.mktemp("reliability")
    (folder / "corpus.txt").write_text(corpus_text(), encoding="utf-8")
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as in the subprocesses (OMP_NUM_THREADS=1): the same float operations everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_cfg(work: Path, out: Path, *overrides: str, base: list[str] = BASE):
    return compose_train(*base, f"data.paths={work / 'corpus.txt'}", *overrides, output_dir=out,
                         cache_dir=work / "cache")


def run_train(work: Path, out: Path, *overrides: str, base: list[str] = BASE) -> dict:
    return train(compose_cfg(work, out, *overrides, base=base))


def env(work: Path, **extra: str) -> dict:
    return {**os.environ, "DYNPOS_CACHE": str(work / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "WANDB_API_KEY": SECRET, **extra}


def cli_args(work: Path, out: Path, *overrides: str, base: list[str] = BASE) -> list[str]:
    return [*base, f"data.paths={work / 'corpus.txt'}", f"hydra.run.dir={out}", *overrides]


def train_losses(run: Path) -> dict[int, str]:
    """``{step: train/loss}`` from the run's CSV log, as written (strings: compared exactly).

    Raises AssertionError when a step is logged twice.
    """
    losses: dict[int, str] = {}
    with open(run / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                step = int(float(row["step"]))
                assert step not in losses, f"step {step} logged twice in {run}"
                losses[step] = row["train/loss"]
    return losses


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(ckpt)["state_dict"]


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def straight(work):
    """The reference: N steps in one go."""
    out = work / "straight"
    metrics = run_train(work, out)
    return out, metrics


# ------------------------------------------------------------------------------ 1. exact resume


def test_resume_from_half_way_gives_bitwise_the_same_run(work, straight):
    ref, _ = straight
    half, resumed = work / "half", work / "resumed"
    run_train(work, half, f"trainer.max_steps={STEPS // 2}")  # decay_steps stays N: the same LR schedule
    last = half / "checkpoints" / "last.ckpt"
    assert load_checkpoint(last)["global_step"] == STEPS // 2
    run_train(work, resumed, f"ckpt_path={last}")

    final_ref = load_checkpoint(ref / "checkpoints" / "last.ckpt")
    final = load_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert final["global_step"] == final_ref["global_step"] == STEPS
    assert_bitwise_equal(final_ref["state_dict"], final["state_dict"])
    for a, b in zip(final_ref["optimizer_states"][0]["state"].values(), final["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert final_ref["lr_schedulers"] == final["lr_schedulers"]
    # the logged losses of steps N/2+1 .. N (0-based N/2 .. N-1) are the same numbers
    later = {s: v for s, v in train_losses(ref).items() if s >= STEPS // 2}
    assert len(later) == STEPS // 2 and train_losses(resumed) == later


def test_same_config_and_seed_give_the_same_run_and_record_versions(work, straight):
    ref, ref_metrics = straight
    again = work / "again"
    metrics = run_train(work, again)
    assert train_losses(again) == train_losses(ref) and len(train_losses(ref)) == STEPS
    assert metrics["val/loss"] == ref_metrics["val/loss"]
    assert_bitwise_equal(weights(ref / "checkpoints" / "last.ckpt"), weights(again / "checkpoints" / "last.ckpt"))

    versions = json.loads((ref / "versions.json").read_text())
    assert json.loads((ref / "result.json").read_text())["versions"] == versions
    assert versions["packages"]["torch"] in (torch.__version__, torch.__version__.split("+")[0])
    for name in ("dynpos", "lightning", "hydra-core", "datasets", "tokenizers"):
        assert versions["packages"][name], name
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout: the commit is recorded
        assert versions["git"]["commit"] == head.stdout.strip()
        assert isinstance(versions["git"]["dirty"], bool)


# ------------------------------------------------------------------------------ 2. crash safety

# Runs train.py with pause points, so the test can SIGKILL it at chosen moments: DYNPOS_TEST_PAUSE
# is "step:<k>" (before training step k) or "save:<name>:<n>" (half-way through writing the n-th
# save of checkpoint <name>). At the pause it creates the marker file and sleeps.
LAUNCHER = textwrap.dedent("""
    import io, os, runpy, sys, time
    import torch
    from dynpos.training.module import LitGPT

    kind, _, arg = os.environ.get("DYNPOS_TEST_PAUSE", "").partition(":")
    marker = os.environ.get("DYNPOS_TEST_MARKER", "")

    def pause():
        open(marker, "w").close()
        time.sleep(600)

    if kind == "step":
        start = LitGPT.on_train_batch_start
        def on_train_batch_start(self, batch, batch_idx):
            if self.global_step == int(arg):
                pause()
            return start(self, batch, batch_idx)
        LitGPT.on_train_batch_start = on_train_batch_start
    if kind == "save":
        name, _, nth = arg.partition(":")
        save, count = torch.save, [0]
        def slow_save(obj, f, *args, **kwargs):
            if name in str(getattr(f, "name", f)):
                count[0] += 1
                if count[0] == int(nth):
                    buffer = io.BytesIO()
                    save(obj, buffer, *args, **kwargs)
                    data = buffer.getvalue()
                    with open(f, "wb") as out:  # dynpos.atomic hands torch.save the temporary path
                        out.write(data[: len(data) // 2])
                        out.flush()
                    pause()
            return save(obj, f, *args, **kwargs)
        torch.save = slow_save
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def start_and_kill(work: Path, out: Path, pause: str) -> None:
    """Start ``train.py resume=auto`` and SIGKILL it at the pause point ``pause``."""
    launcher = work / "launcher.py"
    launcher.write_text(LAUNCHER)
    marker = work / f"paused-{pause.replace(':', '-')}"
    proc = subprocess.Popen(
        [sys.executable, str(launcher), str(ROOT / "train.py"), *cli_args(work, out, "resume=auto")], cwd=ROOT,
        env=env(work, DYNPOS_TEST_PAUSE=pause, DYNPOS_TEST_MARKER=str(marker)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"train.py ended (rc={proc.returncode}) before the pause {pause}: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"no pause at {pause}"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_at_any_moment_costs_only_time(work, straight):
    ref, _ = straight
    out = work / "killed"
    last = out / "checkpoints" / "last.ckpt"

    start_and_kill(work, out, "step:1")  # before the first checkpoint
    assert not last.exists() and not (out / "result.json").exists()

    start_and_kill(work, out, "save:last.ckpt:2")  # a fresh start, killed half-way through writing step 4's last.ckpt
    torn = list((out / "checkpoints").glob(".last.ckpt.tmp-*"))
    assert len(torn) == 1 and torn[0].stat().st_size > 0  # the torn temporary file ...
    assert load_checkpoint(last)["global_step"] == 2  # ... and the previous checkpoint, intact

    start_and_kill(work, out, "step:5")  # resumed from step 2, killed between checkpoints (after step 4's)
    assert load_checkpoint(last)["global_step"] == 4
    assert not list((out / "checkpoints").glob(".*.tmp-*"))  # the dead process's temporary file is gone

    proc = subprocess.run([sys.executable, "train.py", *cli_args(work, out, "resume=auto")], cwd=ROOT, env=env(work),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" in proc.stdout and (out / "result.json").is_file()
    # the same run as the uninterrupted one: same final weights, each step logged once with the same loss
    assert_bitwise_equal(weights(ref / "checkpoints" / "last.ckpt"), weights(last))
    assert train_losses(out) == train_losses(ref)
    assert not any(SECRET.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())


def test_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    with atomic_path(path, fsync=True) as tmp:
        torch.save({"a": torch.ones(3)}, tmp)
    stale = path.parent / ".last.ckpt.tmp-999999999-0a1b2c3d.ckpt"  # a dead process's leftover
    stale.write_bytes(b"torn")
    with atomic_path(path, fsync=True) as tmp:
        torch.save({"a": torch.zeros(3)}, tmp)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("good")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed half-way")
    assert path.read_text() == "good" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


# ------------------------------------------------------------------------------ 3. non-finite loss


@pytest.mark.parametrize("bad_step, stops_at, message", [
    (2, 3, "non-finite training loss nan at step 3"),  # weights NaN after step 2; caught by step 3's loss
    (3, 4, "non-finite validation loss nan at step 4"),  # weights NaN after step 3; caught at step 4's validation
])
def test_non_finite_stops_at_once_and_keeps_the_last_good_checkpoint(work, monkeypatch, capsys, bad_step, stops_at,
                                                                     message):
    def poison(self, optimizer):  # NaN gradients at one step: the update makes every weight NaN
        if self.global_step == bad_step:
            for p in self.parameters():
                p.grad.fill_(float("nan"))

    monkeypatch.setattr(LitGPT, "on_before_optimizer_step", poison, raising=False)
    out = work / f"nan{bad_step}"
    cfg = compose_cfg(work, out)
    with pytest.raises(SystemExit) as exit_:
        guard(lambda: train(cfg))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and "optim.lr=0.003" in lines[0]
    assert "trainer.precision=32-true" in lines[0] and "Traceback" not in err
    good = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert good["global_step"] == 2 < stops_at  # the checkpoint before the divergence, not overwritten
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())
    assert max(train_losses(out)) == stops_at - 1  # no step after the divergence was trained
    assert not (out / "result.json").exists()


def test_a_checkpoint_is_never_written_with_non_finite_weights():
    module = LitGPT({"model": {"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 8},
                     "pos": {"_target_": "dynpos.positional.DPB", "_partial_": True}, "seed": 0,
                     "optim": {"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.99],
                               "warmup_steps": 1, "decay_steps": 10}}, vocab_size=11)
    state = module.state_dict()
    state["model.lm_head.weight"] = torch.full_like(state["model.lm_head.weight"], float("inf"))
    with pytest.raises(FloatingPointError, match="model.lm_head.weight.*no checkpoint was written.*lower optim.lr"):
        module.on_save_checkpoint({"state_dict": state})


# ------------------------------------------------------------------------------ 4. DDP on CPU


# A sitecustomize.py (on PYTHONPATH, so Python runs it in the launching process and in every DDP
# child Lightning starts) that makes each rank write a SHA-256 digest of its parameters into the run
# folder after fit (``digest_rank<r>.txt``): data-parallel ranks must end with identical weights.
DIGESTS = textwrap.dedent("""
    import hashlib
    from pathlib import Path

    import torch
    from dynpos.training.module import LitGPT

    def on_fit_end(self):
        h = hashlib.sha256()
        for name, tensor in self.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
        Path(self.trainer.default_root_dir, f"digest_rank{self.global_rank}.txt").write_text(h.hexdigest())

    LitGPT.on_fit_end = on_fit_end
""")


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_one_process_at_the_same_global_batch(work, monkeypatch):
    """``trainer=ddp`` (2 processes, gloo) with 4 windows per rank against one process with 8.

    Each rank draws its windows from its own seed ``step_seed(seed, step, rank)``, so one process
    with batch 8 would draw other windows than the two ranks together. The single-process run
    here is patched to draw, at every step, rank 0's 4 windows followed by rank 1's 4: the global
    batch of the DDP run. Then the mean loss over the 8 windows equals the mean of the two ranks'
    losses (what DDP logs with ``sync_dist``), and the averaged gradients are the same, so the
    logged training losses and the final validation loss agree to 1e-5 (float reduction order
    differs) and the weights closely. Dropout is off here: dropout masks are seeded per rank too.
    """
    steps, per_rank = 4, 4
    base = [arg for arg in BASE if arg != "~callbacks.bias_plot"]  # plots too: rank 0 only
    # every rank scores all 16 validation windows (in batches of 4 under DDP, of 8 in one process)
    common = ["model.dropout=0.0", f"trainer.max_steps={steps}", f"optim.decay_steps={steps}",
              "callbacks.bias_plot.length=8", "data.val_windows=16"]
    ddp = work / "ddp"
    ddp_base = [("trainer=ddp" if arg == "trainer=debug" else arg) for arg in base] + ["trainer.log_every_n_steps=1"]
    site = work / "site"  # each rank writes a digest of its parameters after fit
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(DIGESTS)
    proc = subprocess.run(
        [sys.executable, "train.py",
         *cli_args(work, ddp, *common, f"data.batch_size={per_rank}", "logger=wandb", base=ddp_base)],
        cwd=ROOT, env=env(work, PYTHONPATH=str(site)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((ddp / "result.json").read_text())

    # the ranks hold identical parameters after training
    digests = [(ddp / f"digest_rank{rank}.txt").read_text() for rank in (0, 1)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]

    # the ranks drew disjoint windows at every step
    tokens = np.load(next((work / "cache").glob("textfiles-*/tokens-*/train.npy")), mmap_mode="r")
    draw = {rank: StepBatches(tokens, 32, per_rank, seed=0, rank=rank) for rank in (0, 1)}
    for step in range(steps):
        assert not set(draw[0].offsets(step)) & set(draw[1].offsets(step))

    # one process, batch 8 = the DDP run's global batch, window for window
    rank_offsets = StepBatches.offsets

    def global_batch(self, step):
        return np.concatenate([rank_offsets(draw[0], step), rank_offsets(draw[1], step)])

    monkeypatch.setattr(StepBatches, "offsets", global_batch)
    single = work / "single"
    metrics = run_train(work, single, *common, f"data.batch_size={2 * per_rank}", "trainer.limit_val_batches=1.0",
                        "trainer.limit_test_batches=1.0", base=base)
    ddp_losses, single_losses = train_losses(ddp), train_losses(single)
    assert sorted(ddp_losses) == sorted(single_losses) == list(range(steps))
    for step in range(steps):
        assert float(ddp_losses[step]) == pytest.approx(float(single_losses[step]), abs=1e-5)
    assert result["metrics"]["val/loss"] == pytest.approx(metrics["val/loss"], abs=1e-5)
    # The weights agree less tightly: AdamW divides each update by the root of its running squared
    # gradient, so a rounding difference in a near-zero gradient moves that weight by up to ~lr.
    for key, value in weights(single / "checkpoints" / "last.ckpt").items():
        torch.testing.assert_close(weights(ddp / "checkpoints" / "last.ckpt")[key], value, atol=1e-3, rtol=0)

    # only rank 0 wrote: the same files as the single-process run (no empty per-process logs)
    def files(run):
        return {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()
                and not p.relative_to(run).as_posix().startswith((".hydra/", "wandb/", "digest_rank"))}

    assert files(ddp) - files(single) == {"wandb_id"}
    assert files(single) <= files(ddp)
    assert (ddp / "samples.txt").read_text().count("=== step") == (single / "samples.txt").read_text().count("=== step")
    assert not any(SECRET.encode() in p.read_bytes() for p in ddp.rglob("*") if p.is_file())
    assert SECRET not in proc.stdout + proc.stderr


def test_every_trainer_preset_writes_checkpoints_atomically():
    trainers = {}
    for preset in ("cpu", "gpu", "ddp", "fsdp", "debug"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            trainers[preset] = compose("train", overrides=[f"trainer={preset}"]).trainer
        targets = [p["_target_"] for p in trainers[preset].plugins]
        assert targets == ["dynpos.training.checkpoint.AtomicCheckpointIO"], preset
    GlobalHydra.instance().clear()
    assert all(trainers[p].max_steps == trainers["cpu"].max_steps for p in ("gpu", "ddp", "fsdp"))  # hardware only
    assert trainers["ddp"].strategy == "ddp" and trainers["ddp"].devices == 2 and trainers["ddp"].num_nodes == 1
    assert trainers["fsdp"].strategy == "fsdp" and trainers["fsdp"].num_nodes == 1


# ------------------------------------------------------------------------------ 6. safe checkpoints


class WritesAFile:
    """A pickle payload: unpickling it runs ``open(path, 'w')``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


def test_a_crafted_pickle_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": WritesAFile(marker)}, evil)

    with pytest.raises(CheckpointError, match="refused to load.*could run code"):
        read_checkpoint(evil, "ckpt_path")
    with pytest.raises(CheckpointError, match="refused to load"):  # Lightning's own resume path
        AtomicCheckpointIO().load_checkpoint(evil)
    with pytest.raises(ValueError, match="weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert not marker.exists()

    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.read_text() == "pwned"


def test_lightning_resume_goes_through_the_safe_reader(tmp_path):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path)
    marker = tmp_path / "pwned.txt"
    evil = tmp_path / "evil.ckpt"
    torch.save({"payload": WritesAFile(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused to load"):
        trainer.strategy.load_checkpoint(evil)
    assert not marker.exists()
