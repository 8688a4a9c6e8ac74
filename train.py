"""Train a dynpos language model: `python train.py [key=value ...]` (see configs/train.yaml)."""

import hydra
from omegaconf import DictConfig

from dynpos.training.cli import run_cli


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_cli(cfg)
    return metrics.get("val/loss")  # what a Hydra sweeper optimises


if __name__ == "__main__":
    main()
