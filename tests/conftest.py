"""Shared test fixtures: compose the real training config with Hydra, as train.py does, and one
short real training run that several test files read."""

import os
import runpy
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from dynpos.config import register

os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
register()


def compose_cfg(*overrides: str, output_dir: Path, cache_dir: Path):
    """The composed ``train.yaml`` with ``overrides``, the run folder ``output_dir`` and the caches in
    ``cache_dir``; ``${hydra:...}`` resolves as under train.py. Hydra's composition errors propagate."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
        del cfg.hydra
    return cfg


def run_main(monkeypatch, capsys, script: str, *args: str) -> tuple[int, str, str]:
    """Run ``script`` (a path from the repository root) as ``__main__`` in this process with ``args``,
    the same code path as the command line without a new interpreter: ``(exit status, stdout, stderr)``."""
    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", [script, *args])
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        GlobalHydra.instance().clear()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One token cache for the session: each corpus is tokenized once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path, cache_dir):
    """``make_cfg(*overrides, output_dir=None)``: :func:`compose_cfg` with the run folder in tmp_path."""

    def make(*overrides: str, output_dir: Path | None = None):
        return compose_cfg(*overrides, output_dir=output_dir or tmp_path / "run", cache_dir=cache_dir)

    return make


@pytest.fixture(scope="session")
def trained(tmp_path_factory, cache_dir):
    """One short real run on Shakespeare with the nano model (60 steps), shared by the tests that read
    a finished run: ``(run folder, metrics)``."""
    from dynpos.training.run import train

    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = compose_cfg("model=nano", "trainer=debug", "trainer.max_steps=60", "trainer.val_check_interval=30",
                      "optim.lr=5e-3", "optim.warmup_steps=10", "data.batch_size=16", "data.val_windows=16",
                      "callbacks.sample.max_new_tokens=40", output_dir=out, cache_dir=cache_dir)
    return out, train(cfg)
