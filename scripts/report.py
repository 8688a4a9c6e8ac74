"""Turn a sweep into a report: mean ± std over seeds per scheme, a plot, and what is within the noise.

    python scripts/report.py multirun/<date>_<time>                 # the folder `train.py -m` wrote
    python scripts/report.py multirun/<date>_<time> baseline=alibi  # keys: configs/report.yaml

Reads every result.json (and scripts/evaluate.py's extrapolation.csv) below the folder, writes
<folder>/report.md and <folder>/report.png and prints the markdown. The noise rule is documented
in dynpos.evaluation.report.
"""

import re
import sys

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from dynpos.evaluation.report import write_report
from dynpos.training.cli import guard


def report(cfg: DictConfig) -> None:
    """Write and print the report of ``cfg.sweep``; ValueError when no sweep is given."""
    if OmegaConf.is_missing(cfg, "sweep") or cfg.sweep is None:
        raise ValueError("sweep is required: python scripts/report.py <multirun dir> (or sweep=<multirun dir>)")
    markdown, md, png = write_report(str(cfg.sweep), cfg.baseline, None if cfg.out is None else str(cfg.out))
    print(markdown)
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"written: {md}" + (f", {png}" if png else ""))


@hydra.main(version_base="1.3", config_path="../configs", config_name="report")
def main(cfg: DictConfig) -> None:
    guard(lambda: report(cfg))


def sweep_argument(argv: list[str]) -> list[str]:
    """``argv`` with a lone first argument (no ``=``, not a flag) turned into ``sweep=<it>``,
    quoted for Hydra's override grammar when it holds more than path characters."""
    if len(argv) < 2 or "=" in argv[1] or argv[1].startswith("-"):
        return argv
    path = argv[1]
    if not re.fullmatch(r"[\w/.:~+@-]+", path):
        path = "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return [argv[0], f"sweep={path}", *argv[2:]]


if __name__ == "__main__":
    sys.argv = sweep_argument(sys.argv)
    main()
