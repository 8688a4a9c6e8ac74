"""The training pipeline: the real train() on composed configs, train.py and the scripts as a user runs them."""

import json
import math
import os
import pty
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from dynpos.training.checkpoint import load_model
from dynpos.training.callbacks import run_id, wandb_logger
from dynpos.training.module import LitGPT, lr_lambda
from dynpos.training.run import main, train

from conftest import ROOT, run_main

TINY = ["model=nano", "trainer=debug", "callbacks.sample.max_new_tokens=4", "data.val_windows=4"]


def environment(tmp_path, **env) -> dict:
    """The environment of a command run by a test: caches in tmp_path, no wandb, one thread, plus ``env``."""
    return {**os.environ, "DYNPOS_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            **env}


def run(args, tmp_path, cwd=ROOT, **env):
    """Run a command (from the repository root by default) with caches in tmp_path; return the CompletedProcess."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env=environment(tmp_path, **env), timeout=600)


def test_training_on_real_text_lowers_the_loss_and_writes_the_run_folder(trained):
    out, metrics = trained
    result = json.loads((out / "result.json").read_text())
    vocab = load_model(out / "checkpoints" / "best.ckpt")[0].config.vocab_size
    # From ln(vocab) ~ 4.2 nats at init, 60 steps on Shakespeare must gain a clear margin.
    assert metrics["val/loss"] < math.log(vocab) - 0.8
    assert math.isclose(metrics["val/ppl"], math.exp(metrics["val/loss"]), rel_tol=1e-4)
    assert 0 < metrics["test/bpb"] < 8 and metrics["test/loss"] > 0
    assert result["metrics"]["val/loss"] == pytest.approx(metrics["val/loss"])
    assert result["pos"] == "dpb" and result["num_params"] > 0
    assert result["config"]["data"]["batch_size"] == 16 and result["config"]["model"]["n_layer"] == 2
    for name in ("tokenizer.json", "versions.json", "samples.txt", "plots/bias.png", "checkpoints/last.ckpt",
                 "checkpoints/best.ckpt", "csv/metrics.csv"):
        assert (out / name).is_file(), name
    assert (out / "plots" / "bias.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # prompted with the corpus's own text: the first 16 characters of the validation split (Julius Caesar)
    assert (out / "samples.txt").read_text().splitlines()[1] == "JULIUS CAESAR"


def test_checkpoint_alone_rebuilds_model_and_tokenizer_and_stores_the_config_once(trained):
    out, metrics = trained
    model, tokenizer, hp = load_model(out / "checkpoints" / "best.ckpt")
    assert hp["config"]["model"]["n_layer"] == 2 and hp["config"]["pos"]["_target_"] == "dynpos.positional.DPB"
    assert tokenizer.decode(tokenizer.encode("ROMEO: hi").ids) == "ROMEO: hi"
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokenizer.encode("To be").ids]))
    assert logits.shape == (1, 5, model.config.vocab_size)
    checkpoint = torch.load(out / "checkpoints" / "best.ckpt", weights_only=True, mmap=True)
    assert "config" not in checkpoint  # only in hyper_parameters
    assert [k for k, v in checkpoint.items() if isinstance(v, dict) and "tokenizer" in v] == ["TextDataModule"]
    assert set(checkpoint["TextDataModule"]) == {"tokenizer"}


def test_logged_losses_are_the_metrics(trained):
    out, metrics = trained
    rows = (out / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "train/lr" in header and "val/loss" in header  # the module logs the learning rate itself


def test_sample_script_generates_from_the_checkpoint(trained, monkeypatch, capsys):
    out, _ = trained
    code, stdout, stderr = run_main(monkeypatch, capsys, "scripts/sample.py",
                                    f"ckpt={out / 'checkpoints' / 'best.ckpt'}", "prompt=ROMEO:", "max_new_tokens=30",
                                    "seed=1")
    assert code == 0, stderr
    text = stdout.rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30


def test_sample_script_names_characters_outside_the_vocabulary(trained, monkeypatch, capsys):
    out, _ = trained
    code, stdout, stderr = run_main(monkeypatch, capsys, "scripts/sample.py", f"ckpt={out / 'checkpoints' / 'best.ckpt'}",
                                    "prompt='ROMEO\u20ac'", "max_new_tokens=2")
    assert code == 0 and "no token for '\u20ac'" in stderr and stdout.startswith("ROMEO<unk>")


def test_evaluate_script_writes_its_own_folder_and_never_overwrites(trained, monkeypatch, capsys):
    out, metrics = trained
    ckpt = out / "checkpoints" / "best.ckpt"
    code, _, stderr = run_main(monkeypatch, capsys, "scripts/evaluate.py", f"ckpt={ckpt}", "eval.max_tokens=2048")
    assert code == 0, stderr[-2000:]
    (folder,) = (out / "evaluate").iterdir()  # a new folder: nothing train.py wrote is touched
    assert folder.name.startswith("best-") and (folder / "extrapolation.png").is_file()
    rows = json.loads((folder / "extrapolation.json").read_text())["rows"]
    assert [r["length"] for r in rows] == [32, 64, 128, 256]  # from the model's training length up
    code, _, stderr = run_main(monkeypatch, capsys, "scripts/evaluate.py", f"ckpt={ckpt}", f"out={folder}")
    assert code == 2 and "already holds a result" in stderr


@pytest.mark.slow
def test_train_py_runs_end_to_end_on_the_nano_preset(tmp_path):
    # No hydra.run.dir: the default timestamped run folder, as a user's first command gets it.
    proc = run([str(ROOT / "train.py"), "model=nano", "trainer=debug"], tmp_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out,) = (tmp_path / "runs").glob("*_dpb-nano-shakespeare")
    assert "val/loss" in proc.stdout and (out / "result.json").is_file()
    assert "parameters" in proc.stdout and "Epoch 0/-2" not in proc.stdout
    assert not (out / "train.log").exists()  # Hydra's log file only when something is logged: never empty
    # a pipe gets progress lines, with the latest validation loss (step 3's)
    assert any(re.fullmatch(r"step 6/6 \| train/loss \d\.\d{4} \| val/loss \d\.\d{4} \| [\d,]+ tokens/s \| ETA [\d:]+",
                            line) for line in proc.stdout.splitlines()), proc.stdout[-1500:]
    # the printed paths are whole lines (not wrapped at 80 columns), ready to copy
    assert f"checkpoint: {out.resolve() / 'checkpoints' / 'best.ckpt'}" in proc.stdout.splitlines()
    assert f"result: {out.resolve() / 'result.json'}" in proc.stdout.splitlines()


@pytest.mark.slow
def test_a_compiled_run_writes_plain_checkpoints_that_sample_evaluate_and_resume(make_cfg, tmp_path, monkeypatch,
                                                                                capsys):
    out = tmp_path / "compiled"
    train(make_cfg(*TINY, "model.compile=true", "trainer.max_steps=4", output_dir=out))
    ckpt = out / "checkpoints" / "last.ckpt"
    assert not any("_orig_mod" in k for k in torch.load(ckpt, weights_only=True, mmap=True)["state_dict"])
    code, stdout, stderr = run_main(monkeypatch, capsys, "scripts/sample.py", f"ckpt={ckpt}", "max_new_tokens=5")
    assert code == 0, stderr
    code, _, stderr = run_main(monkeypatch, capsys, "scripts/evaluate.py", f"ckpt={ckpt}", "eval.lengths=[32]")
    assert code == 0, stderr
    metrics = train(make_cfg(*TINY, "trainer.max_steps=6", f"ckpt_path={ckpt}",  # model.compile may change
                             output_dir=tmp_path / "continued"))
    assert math.isfinite(metrics["val/loss"])


@pytest.mark.slow
def test_ctrl_c_says_how_to_continue_and_the_command_does(tmp_path):
    env = environment(tmp_path)
    out = tmp_path / "run"
    args = [str(ROOT / "train.py"), "model=nano", "trainer=debug", "trainer.max_steps=400",
            "trainer.val_check_interval=5", "callbacks.progress_bar.line_every=1", f"hydra.run.dir={out}"]
    # SIGINT as a terminal delivers it, even where this test runs as a background job (which ignores SIGINT)
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, sent = [], None
    for line in proc.stdout:  # after a checkpoint (step 5), press Ctrl-C; again if training still goes on 10 steps
        lines.append(line)   # later (a signal that lands in a __del__ is lost: Python reports "Exception ignored")
        step = int(line.split()[1].split("/")[0]) if line.startswith("step ") else 0
        if step >= 7 and (sent is None or step >= sent + 10):
            proc.send_signal(signal.SIGINT)
            sent = step
    stdout = "".join(lines)
    proc.wait(timeout=120)
    assert proc.returncode == 1 and not (out / "result.json").exists(), stdout[-1500:] + proc.stderr.read()[-1500:]
    held = int(re.search(r"checkpoints/last\.ckpt holds step (\d+), where it continues", stdout).group(1))
    assert held >= 5 and held % 5 == 0  # the last validation's checkpoint
    command = stdout.split("continue with:\n")[1].splitlines()[0]
    assert command.endswith(f"resume=auto hydra.run.dir={out}") and "trainer.max_steps=400" in command
    again = subprocess.run([sys.executable, *shlex.split(command)[1:], f"trainer.max_steps={held + 5}"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"at step {held}" in again.stdout and (out / "result.json").is_file()


@pytest.mark.slow
def test_sigterm_says_how_to_continue_and_exits_143(tmp_path):
    env = environment(tmp_path)
    args = [str(ROOT / "train.py"), "model=nano", "trainer=debug", "trainer.max_steps=400",
            "trainer.val_check_interval=5", "callbacks.progress_bar.line_every=1", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen([sys.executable, *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # a batch scheduler's stop: SIGTERM after a checkpoint (step 5)
        if line.startswith("step 7/"):
            proc.send_signal(signal.SIGTERM)
            break
    stdout = proc.stdout.read()
    assert proc.wait(timeout=120) == 143  # not 0: `train.py && next` must not run on
    assert "holds step 5, where it continues; continue with:" in stdout


@pytest.mark.slow
def test_a_continued_run_shows_its_progress_against_the_whole_run_on_a_terminal(tmp_path):
    env = environment(tmp_path, COLUMNS="200", TERM="xterm")
    first = run([str(ROOT / "train.py"), *TINY, f"hydra.run.dir={tmp_path / 'first'}"], tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    main_fd, terminal = pty.openpty()  # Rich draws its bar only on a terminal
    args = [str(ROOT / "train.py"), *TINY, "trainer.max_steps=12", f"hydra.run.dir={tmp_path / 'second'}",
            f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'last.ckpt'}"]
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=terminal, stderr=terminal)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # the terminal closes when the run ends
            break
        if not chunk:
            break
        shown += chunk
    assert proc.wait(timeout=60) == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode("utf-8", "replace"))
    counts = re.findall(r"train \D*?(\d+)/(\d+) ", text)  # optimizer steps of the whole run, from step 6
    assert counts[-1] == ("12", "12") and {total for _, total in counts} == {"12"}
    assert min(int(step) for step, _ in counts[1:]) >= 6  # after the bar's first frame (0/12)


@pytest.mark.slow
def test_a_refused_command_prints_one_line_and_leaves_no_run_folder(tmp_path):
    proc = run([str(ROOT / "train.py"), "model=nano", "trainer=debug", "data.batch_size=-1"], tmp_path, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: data.batch_size=-1: give a positive integer (set DYNPOS_DEBUG=1 for the traceback)"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_logger_none_trains(make_cfg):
    metrics = train(make_cfg(*TINY, "logger=none"))
    assert math.isfinite(metrics["val/loss"])


def test_training_always_ends_with_a_validation(make_cfg, tmp_path):
    out = tmp_path / "short"
    train(make_cfg(*TINY, "trainer.max_steps=4", "trainer.val_check_interval=250", output_dir=out))
    result = json.loads((out / "result.json").read_text())
    assert result["best_checkpoint"] == str(out / "checkpoints" / "best.ckpt") and result["bias_plot"]
    assert result["last_checkpoint"] == str(out / "checkpoints" / "last.ckpt")
    assert torch.load(result["best_checkpoint"], weights_only=True, mmap=True)["global_step"] == 4
    assert torch.load(result["last_checkpoint"], weights_only=True, mmap=True)["global_step"] == 4
    assert (out / "samples.txt").read_text().count("=== step 4 ===") == 1  # validated once at step 4


def test_hub_corpus_offline_is_one_line_and_leaves_no_folder(make_cfg, tmp_path, monkeypatch, capsys):
    import dynpos.data.corpora as corpora

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(corpora, "load_dataset", offline)
    out = tmp_path / "hub"
    out.mkdir()
    (out / ".hydra").mkdir()  # what Hydra writes before the job starts
    with pytest.raises(SystemExit) as exit_:
        main(make_cfg(*TINY, "data=wikitext2", output_dir=out))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "error: corpus 'wikitext2'" in err
    assert "data=shakespeare" in err and not out.exists()


def test_unknown_scheme_option_is_refused_before_any_data(make_cfg, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(make_cfg(*TINY, "+pos.depthh=3", "paths.cache_dir=/nonexistent/never/read"))
    err = capsys.readouterr().err
    assert "error: pos.depthh is not an option of DPB: its options are dim, depth" in err


def test_wandb_run_id_lives_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    first = run_id(tmp_path)
    assert (tmp_path / "wandb_id").read_text() == first and run_id(tmp_path) == first and len(first) == 8
    logger = wandb_logger(project="dynpos", save_dir=str(tmp_path))
    assert logger.version == first  # a resumed run reuses it
    assert "anonymous" not in logger._wandb_init  # wandb warns that the setting has no effect whenever it is passed


def test_lr_schedule_warmup_then_cosine_to_min():
    assert lr_lambda(0, 10, 110, 0.1) == pytest.approx(1 / 11)
    assert lr_lambda(9, 10, 110, 0.1) == pytest.approx(10 / 11)
    assert lr_lambda(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_lambda(60, 10, 110, 0.1) == pytest.approx(0.55)  # half-way: 0.1 + 0.5 * 0.9
    assert lr_lambda(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_lambda(500, 10, 110, 0.1) == pytest.approx(0.1)


def tiny_module() -> LitGPT:
    return LitGPT({"model": {"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 8},
                   "pos": {"_target_": "dynpos.positional.DPB", "_partial_": True}, "seed": 0,
                   "optim": {"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.99],
                             "warmup_steps": 1, "decay_steps": 10}}, vocab_size=11)


def test_weight_decay_only_on_matrices():
    module = tiny_module()
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == module.model.num_params()


def test_evaluation_loss_is_token_weighted_over_an_uneven_last_batch():
    """Batches of 3 and 1 windows with mean losses a and b: the exact mean is (3a + b) / 4, not (a + b) / 2."""
    module = tiny_module().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 11, (n, 9), generator=g) for n in (3, 1)]
    nats = targets = 0.0
    with torch.no_grad():
        for batch in batches:
            x, y = batch[:, :-1], batch[:, 1:].clone()
            y[0, :3] = -1  # ignored targets do not count
            module.validation_step((x, y), 0)
            logits, _ = module.model(x)
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1,
                                                       reduction="none")
            nats += losses.sum().item()
            targets += (y != -1).sum().item()
    exact = (module.eval_nats.compute() / module.eval_targets.compute()).item()
    assert targets == 3 * 8 + 8 - 6 and exact == pytest.approx(nats / targets, rel=1e-6)


@pytest.mark.slow
def test_evaluate_at_the_training_length_equals_training_validation(trained):
    """The same checkpoint, split and windows give the same number through train.py's validation
    (Lightning, token-weighted sums) and scripts/evaluate.py's path (evaluate_lengths), to the last
    printed digit: whole split, non-overlapping windows of block_size."""
    import lightning as L
    from omegaconf import OmegaConf

    from dynpos.evaluation.extrapolate import evaluate_lengths
    from dynpos.training.run import build_datamodule

    out, _ = trained
    model, tokenizer, hp = load_model(out / "checkpoints" / "best.ckpt")
    datamodule = build_datamodule(OmegaConf.create(hp["config"]), tokenizer_json=tokenizer.to_str(),
                                  val_windows=None, eval_batch_size=64)
    datamodule.setup("validate")
    module = LitGPT(hp["config"], vocab_size=hp["vocab_size"], bytes_per_token=datamodule.bytes_per_token)
    module.model.load_state_dict(model.state_dict())
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    validated = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    block = model.config.block_size
    (row,) = evaluate_lengths(model, datamodule.tokens["validation"], [block], batch_size=64,
                              bytes_per_token=datamodule.bytes_per_token["validation"])
    assert row["tokens"] == (len(datamodule.tokens["validation"]) - 1) // block * block
    assert f"{validated['val/loss']:.4f}" == f"{row['loss']:.4f}" and f"{validated['val/bpb']:.4f}" == f"{row['bpb']:.4f}"


def test_import_dynpos_lets_idle_openmp_threads_sleep_unless_the_user_chose(tmp_path):
    code = "import os, dynpos; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "PASSIVE\n"
    env["OMP_WAIT_POLICY"] = "active"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout == "active\n"
