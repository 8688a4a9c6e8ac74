"""Regenerate every figure README quotes, at the current commit, with one command.

    python scripts/figures.py all                      # every section: hours on a 2-core CPU
    python scripts/figures.py default nanogpt          # some sections
    python scripts/figures.py all --dry-run            # print the commands, run nothing
    python scripts/figures.py ablate --docs            # also copy the PNGs and bench.json README shows into docs/

Sections, each README's own commands (``--list`` prints them):

* ``default``: ``python train.py`` (Quick start: validation/test loss, bits per byte, the bias plot).
* ``nanogpt``: nanoGPT's CPU settings on tiny Shakespeare cut 90/10 by characters, ``pos=learned``
  and ``pos=dpb`` (README "Reproducing nanoGPT's CPU figure").
* ``ablate``: ``experiment=ablate_pos``, nine schemes, seeds 0-2, then ``scripts/report.py``.
* ``wikitext2``: the same ablation on WikiText-2 (BPE 4096, block 128, both protocols), training on
  its validation file and scoring the two halves of its test file, then ``scripts/report.py``.
* ``lengthgen``: ``experiment=lengthgen`` on copy, reverse and sort, then ``scripts/report.py``.
* ``bench``: README's two ``scripts/bench.py`` commands (Performance: eager grid and modes; compiled).

Everything goes under ``--out`` (default ``runs/figures/<commit>``), one folder per section, with
each command's output in ``<section>.log``; ``figures.md`` there collects the commit, the command
lines, each single run's losses and each sweep's report. The measurement corpora come from
``--shared`` (default ``../shared/data``: ``tinyshakespeare/input.txt``,
``wikitext2-eval/{valid,test}.txt``). A missing corpus file stops the section before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dynpos.atomic import write_text

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = "dpb,alibi,rope,t5,learned,sinusoidal,nope,fire,kerple"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # sweeps on a shared 2-core machine (README, Ablating positional schemes)
NANOGPT = ["model.block_size=64", "data.batch_size=12", "model.bias=false", "trainer.max_steps=2000",
           "trainer.val_check_interval=500", "data.val_windows=null"]
WIKITEXT2 = ["experiment=ablate_pos", "data=textfiles", "tokenizer=bpe", "tokenizer.vocab_size=4096",
             "model.block_size=128", "eval.lengths=[128,256,512,1024]", "eval.max_tokens=65536",
             "eval.protocol=both", "trainer.max_steps=400", "optim.decay_steps=400", "data.batch_size=16"]
BENCH = ["--presets", "micro", "--blocks", "256", "1024", "--schemes", "dpb", "nope", "learned", "alibi",
         "--paths", "auto", "sdpa", "--precision", "32", "--extra", "dpb:auto:bf16:256", "--batch", "8",
         "--reps", "7", "--threads", "1", "--nanogpt", "--eval-memory", "--generate"]
BENCH_COMPILE = ["--presets", "micro", "--blocks", "256", "1024", "--schemes", "dpb", "nope", "--paths", "auto",
                 "--compile", "--batch", "8", "--reps", "5", "--threads", "1", "--no-xt"]


@dataclass
class Step:
    """One command of a section: ``argv`` run from the repository root with ``env`` added; or, with
    ``copy`` set, a file copied into the repository (``--docs`` only)."""

    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    copy: tuple[Path, str] | None = None

    def __str__(self) -> str:
        if self.copy:
            return f"cp {self.copy[0]} {self.copy[1]}"
        argv = ["python" if a == sys.executable else a for a in self.argv]
        return " ".join([*(f"{k}={v}" for k, v in self.env.items()), *argv])


def cut_at_article(text: str) -> tuple[str, str]:
    """Cut WikiText text in two before the first article title (`` = Title = ``) in its second half
    of lines; raises ValueError when there is none."""
    lines = text.splitlines(keepends=True)
    for i in range(len(lines) // 2, len(lines)):
        if lines[i].startswith(" = ") and not lines[i].startswith(" = = "):
            return "".join(lines[:i]), "".join(lines[i:])
    raise ValueError("no article title ( = Title = ) in the second half of the WikiText test file")


def prepare(section: str, out: Path, shared: Path) -> None:
    """Write the corpus files ``section`` trains on under ``out`` (nanogpt: train/val cut 90/10 by
    characters, as nanoGPT's prepare.py; wikitext2: the test file's two halves)."""
    if section == "nanogpt":
        text = (shared / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
        n = int(len(text) * 0.9)
        (out / "train.txt").write_text(text[:n], encoding="utf-8")
        (out / "val.txt").write_text(text[n:], encoding="utf-8")
    elif section == "wikitext2":
        first, second = cut_at_article((shared / "wikitext2-eval" / "test.txt").read_text(encoding="utf-8"))
        (out / "test_a.txt").write_text(first, encoding="utf-8")
        (out / "test_b.txt").write_text(second, encoding="utf-8")


# The sections that read measurement corpora: (files under --shared, where they come from, what prepare() writes).
CORPORA = {
    "nanogpt": (["tinyshakespeare/input.txt"], "input.txt of karpathy/char-rnn's tinyshakespeare",
                "train.txt, val.txt: tinyshakespeare/input.txt cut 90/10 by characters"),
    "wikitext2": (["wikitext2-eval/valid.txt", "wikitext2-eval/test.txt"],
                  "wiki.valid.raw and wiki.test.raw of WikiText-2 (raw), renamed valid.txt and test.txt",
                  "test_a.txt, test_b.txt: wikitext2-eval/test.txt cut before an article in its second half"),
}


def sections(out: Path, shared: Path) -> dict[str, list[Step]]:
    """Every section's commands, writing under ``out/<section>``."""
    py = sys.executable

    def train(section: str, *overrides: str, sweep: str | None = None, run: str = "run") -> Step:
        where = f"hydra.sweep.dir={out / section / sweep}" if sweep else f"hydra.run.dir={out / section / run}"
        return Step([py, "train.py", *(["-m"] if sweep else []), *overrides, where], ONE_THREAD if sweep else {})

    def report(section: str, png: str | None = None) -> list[Step]:
        steps = [Step([py, "scripts/report.py", f"sweep={out / section}", f"out={out / section}"])]
        return steps + ([Step(copy=(out / section / "report.png", f"docs/{png}"))] if png else [])

    nano = out / "nanogpt"
    data = [f"data.train={nano / 'train.txt'}", f"data.validation={nano / 'val.txt'}", f"data.test={nano / 'val.txt'}"]
    wt = out / "wikitext2"
    wt_data = [f"data.train={shared / 'wikitext2-eval' / 'valid.txt'}", f"data.validation={wt / 'test_a.txt'}",
               f"data.test={wt / 'test_b.txt'}"]
    lengthgen = [train("lengthgen", "experiment=lengthgen", f"data={task}", f"pos={SCHEMES}", "seed=0,1,2",
                       sweep=task) for task in ("copy", "reverse", "sort")]
    return {
        "default": [train("default"), Step(copy=(out / "default" / "run" / "plots" / "bias.png", "docs/default_bias.png"))],
        "nanogpt": [train("nanogpt", "data=textfiles", *data, *NANOGPT, f"pos={pos}", run=pos) for pos in ("learned", "dpb")],
        "ablate": [train("ablate", "experiment=ablate_pos", f"pos={SCHEMES}", "seed=0,1,2", sweep="sweep"),
                   *report("ablate", "ablate_pos.png")],
        "wikitext2": [train("wikitext2", *WIKITEXT2, *wt_data, f"pos={SCHEMES}", "seed=0,1,2", sweep="sweep"),
                      *report("wikitext2", "ablate_pos_wikitext2.png")],
        "lengthgen": [*lengthgen, *report("lengthgen"),
                      *(Step(copy=(out / "lengthgen" / f"lengthgen_{t}.png", f"docs/lengthgen_{t}.png"))
                        for t in ("copy", "reverse", "sort"))],
        "bench": [Step([py, "scripts/bench.py", *BENCH, "--out", str(out / "bench" / "bench.json")]),
                  Step([py, "scripts/bench.py", *BENCH_COMPILE, "--out", str(out / "bench" / "bench_compile.json")]),
                  Step(copy=(out / "bench" / "bench.json", "docs/bench.json")),
                  Step(copy=(out / "bench" / "bench_compile.json", "docs/bench_compile.json"))],
    }


def summary(section: str, out: Path) -> str:
    """The markdown ``figures.md`` gets for a finished section: single runs' losses, sweeps' reports."""
    if (out / section / "report.md").exists():
        return (out / section / "report.md").read_text(encoding="utf-8")
    rows = []
    for result in sorted((out / section).glob("*/result.json")):
        r = json.loads(result.read_text(encoding="utf-8"))
        keys = ("val/loss", "val/bpb", "test/loss", "test/bpb")
        rows.append(f"| {result.parent.name} | " + " | ".join(f"{r['metrics'][k]:.4f}" for k in keys) + " |")
    if not rows:
        return f"see {out / section}.log"
    return "| run | val loss | val bpb | test loss | test bpb |\n|---|--:|--:|--:|--:|\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sections", nargs="*", help="all, or any of: default nanogpt ablate wikitext2 lengthgen bench")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default runs/figures/<commit>)")
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data",
                        help="the measurement corpora (tinyshakespeare/, wikitext2-eval/); default: %(default)s")
    parser.add_argument("--docs", action="store_true", help="copy the PNGs and bench.json README shows into docs/")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--list", action="store_true", help="print every section's commands")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    out = (args.out or ROOT / "runs" / "figures" / commit).resolve()
    plan = sections(out, args.shared.resolve())
    chosen = list(plan) if args.list or "all" in args.sections else args.sections
    unknown = [s for s in chosen if s not in plan]
    if unknown or not chosen:
        parser.error(f"sections: choose all or any of {', '.join(plan)} (got {' '.join(unknown) or 'none'})")
    if args.list or args.dry_run:
        for name in chosen:
            prepared = [f"(writes {CORPORA[name][2]}, under {out / name})"] if name in CORPORA else []
            print(f"# {name}\n" + "\n".join(prepared + [str(s) for s in plan[name] if args.docs or not s.copy]))
        return 0
    for name in chosen:
        files, source, _ = CORPORA.get(name, ([], "", ""))
        missing = [str(args.shared.resolve() / f) for f in files if not (args.shared / f).is_file()]
        if missing:
            parser.error(f"section {name} needs {', '.join(missing)} ({source}): give the folder with --shared")
    done = []
    for name in chosen:
        walls: list[str] = []
        (out / name).mkdir(parents=True, exist_ok=True)
        prepare(name, out / name, args.shared.resolve())
        with open(out / f"{name}.log", "w", encoding="utf-8") as log:
            for step in plan[name]:
                print(f"[{name}] {step}", flush=True)
                if step.copy:
                    if args.docs:
                        shutil.copyfile(step.copy[0], ROOT / step.copy[1])
                    continue
                log.write(f"$ {step}\n")
                log.flush()
                start = time.perf_counter()
                run = subprocess.run(step.argv, cwd=ROOT, env={**os.environ, **step.env}, stdout=log,
                                     stderr=subprocess.STDOUT)
                walls.append(f"{time.perf_counter() - start:.0f} s  {step}")
                if run.returncode:
                    print(f"[{name}] failed (exit {run.returncode}): see {out / name}.log", file=sys.stderr)
                    return run.returncode
        done.append(f"## {name}\n\nWall time of each command:\n\n```\n" + "\n".join(walls)
                    + f"\n```\n\n{summary(name, out)}\n")
        write_text(out / "figures.md", f"# README figures at commit {commit}\n\n" + "\n".join(done))
    print(f"written: {out / 'figures.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
