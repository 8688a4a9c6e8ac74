"""Shared test fixtures: compose the real training config with Hydra, as train.py does."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides)``: the composed ``train.yaml`` with the run folder and caches in tmp_path."""

    def make(*overrides: str, output_dir: Path | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
            cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # so ${hydra:...} resolves as under train.py
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir or tmp_path / "run")
            cfg.paths.cache_dir = str(tmp_path / "cache")
            del cfg.hydra
        return cfg

    yield make
    GlobalHydra.instance().clear()
