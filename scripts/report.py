"""Turn a sweep into a report: mean ± std over seeds per scheme, a plot, and what is within the noise.

    python scripts/report.py multirun/<date>_<time>                 # the folder `train.py -m` wrote
    python scripts/report.py multirun/<date>_<time> --baseline alibi

Reads every result.json below the folder, writes <folder>/report.md and <folder>/report.png and
prints the markdown. The noise rule is documented in dynpos.evaluation.report.
"""

import argparse

from rich.console import Console

from dynpos.evaluation.report import write_report
from dynpos.training.cli import guard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="the multirun folder of `python train.py -m ...` (holds */result.json)")
    parser.add_argument("--baseline", default=None,
                        help="the scheme the others are compared with (default: dpb when present)")
    args = parser.parse_args()
    markdown, md, png = write_report(args.sweep_dir, args.baseline)
    print(markdown)
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"written: {md}" + (f", {png}" if png else ""))


if __name__ == "__main__":
    guard(main)
