"""Train a dynpos language model: `python train.py [key=value ...]` (see configs/train.yaml)."""

import hydra
from omegaconf import DictConfig

from dynpos.config import register
from dynpos.training.run import main as run

register()  # the typed schema that configs/train.yaml starts from


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run(cfg)
    return metrics.get("val/loss")  # what a Hydra sweeper optimises


if __name__ == "__main__":
    main()
