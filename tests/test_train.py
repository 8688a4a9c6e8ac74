"""The training pipeline: the real train() on composed configs, train.py and sample.py as a user runs them."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dynpos.training.checkpoint import load_model
from dynpos.training.module import LitGPT, lr_lambda
from dynpos.training.run import train

from conftest import ROOT


def run(args, tmp_path, cwd=ROOT, **env):
    """Run a command (from the repository root by default) with caches in tmp_path; return the CompletedProcess."""
    environment = {**os.environ, "DYNPOS_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "disabled", **env}
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=environment, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real run on Shakespeare with the nano model, shared by the tests below."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from conftest import CONFIGS

    tmp = tmp_path_factory.mktemp("trained")
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=["model=nano", "trainer=debug", "trainer.max_steps=80",
                                          "trainer.val_check_interval=40", "optim.lr=3e-3", "optim.warmup_steps=10",
                                          "batch_size=16", "callbacks.sample.max_new_tokens=40"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
        cfg.paths.cache_dir = str(tmp / "cache")
        del cfg.hydra
    metrics = train(cfg)
    return tmp / "run", metrics


def test_training_on_real_text_lowers_the_loss_and_writes_the_run_folder(trained):
    out, metrics = trained
    result = json.loads((out / "result.json").read_text())
    vocab = load_model(out / "checkpoints" / "best.ckpt")[0].config.vocab_size
    # From ln(vocab) ~ 4.2 nats at init, 80 steps on Shakespeare must gain a clear margin.
    assert metrics["val/loss"] < math.log(vocab) - 0.8
    assert math.isclose(metrics["val/ppl"], math.exp(metrics["val/loss"]), rel_tol=1e-4)
    assert 0 < metrics["test/bpb"] < 8 and metrics["test/loss"] > 0
    assert result["metrics"]["val/loss"] == pytest.approx(metrics["val/loss"])
    assert result["pos"] == "dpb" and result["num_params"] > 0
    for name in ("config.yaml", "tokenizer.json", "samples.txt", "plots/bias.png", "checkpoints/last.ckpt",
                 "checkpoints/best.ckpt", "csv/metrics.csv"):
        assert (out / name).is_file(), name
    assert (out / "plots" / "bias.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ROMEO:" in (out / "samples.txt").read_text()


def test_checkpoint_alone_rebuilds_model_and_tokenizer(trained):
    out, metrics = trained
    model, tokenizer, hp = load_model(out / "checkpoints" / "best.ckpt")
    assert hp["model"]["n_layer"] == 2 and hp["pos"]["_target_"] == "dynpos.positional.DPB"
    assert tokenizer.decode(tokenizer.encode("ROMEO: hi").ids) == "ROMEO: hi"
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokenizer.encode("To be").ids]))
    assert logits.shape == (1, 5, model.config.vocab_size)


def test_sample_script_generates_from_the_checkpoint(trained, tmp_path):
    out, _ = trained
    proc = run(["scripts/sample.py", f"ckpt={out / 'checkpoints' / 'best.ckpt'}", "prompt=ROMEO:",
                "max_new_tokens=30", "seed=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.rstrip("\n")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30


def test_train_py_runs_end_to_end_on_the_nano_preset(tmp_path):
    # No hydra.run.dir: the default timestamped run folder, as a user's first command gets it.
    proc = run([str(ROOT / "train.py"), "model=nano", "trainer=debug"], tmp_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out,) = (tmp_path / "runs").glob("*_dpb-nano-shakespeare")
    assert "val/loss" in proc.stdout and (out / "result.json").is_file()
    assert "parameters" in proc.stdout
    # the printed paths are whole lines (not wrapped at 80 columns), ready to copy
    assert f"checkpoint: {out.resolve() / 'checkpoints' / 'best.ckpt'}" in proc.stdout.splitlines()
    assert f"result: {out.resolve() / 'result.json'}" in proc.stdout.splitlines()


@pytest.mark.parametrize("override, fragment", [
    ("pos=foo", "pos/foo"),
    ("model.n_embd=31", "model.n_embd=31 is not divisible by model.n_head=2"),
    ("model.block_size=100000000", "block_size"),
    ("data=textfiles", "data.paths"),
    ("optim.lr=-1", "optim.lr"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, override, fragment):
    out = tmp_path / "bad"
    proc = run(["train.py", "model=nano", "trainer=debug", override, f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode != 0
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "checkpoints").exists()


def test_lr_schedule_warmup_then_cosine_to_min():
    assert lr_lambda(0, 10, 110, 0.1) == pytest.approx(1 / 11)
    assert lr_lambda(9, 10, 110, 0.1) == pytest.approx(10 / 11)
    assert lr_lambda(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_lambda(60, 10, 110, 0.1) == pytest.approx(0.55)  # half-way: 0.1 + 0.5 * 0.9
    assert lr_lambda(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_lambda(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    module = LitGPT(model={"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 8},
                    pos={"_target_": "dynpos.positional.DPB", "_partial_": True},
                    optim={"lr": 1e-3, "min_lr": 1e-4, "weight_decay": 0.1, "betas": [0.9, 0.99],
                           "warmup_steps": 1, "decay_steps": 10}, vocab_size=11)
    optimizer = module.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == module.model.num_params()
