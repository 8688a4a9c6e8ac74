"""Train short, test long: loss and bits per byte of a checkpoint at each evaluation length.

    python scripts/evaluate.py ckpt=runs/<run>/checkpoints/best.ckpt eval.lengths=[128,256,512,1024]
    python scripts/evaluate.py ckpt=... eval.protocol=both eval.stride=64

Uses the checkpoint's own data config and tokenizer (and the cached token arrays); writes
extrapolation.csv, .png and .json into a new folder ``<run>/evaluate/<ckpt>-<date>-<time>`` (or
``out``, which must not hold an earlier result) and prints the table. Keys: configs/evaluate.yaml.
"""

import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from dynpos.atomic import write_json
from dynpos.config import register, validate
from dynpos.evaluation.extrapolate import run_extrapolation
from dynpos.training.checkpoint import load_model
from dynpos.training.cli import guard
from dynpos.training.run import build_datamodule

register()


def output_folder(cfg, ckpt: Path) -> Path:
    """``out``, refused when it already holds a result; else a new folder beside the run's checkpoints."""
    if cfg.out is not None:
        out = Path(cfg.out)
        if (out / "extrapolation.csv").exists():
            raise FileExistsError(f"out={out} already holds a result (extrapolation.csv): give another out= "
                                  "or leave it out for a new folder")
        return out
    return ckpt.resolve().parent.parent / "evaluate" / f"{ckpt.stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def evaluate(cfg: DictConfig) -> None:
    cfg = validate(cfg)
    model, tokenizer, hp = load_model(cfg.ckpt, "ckpt")
    if cfg.attn is not None:
        model.config.attn = cfg.attn
    run_cfg = OmegaConf.create(hp["config"])
    block = model.config.block_size
    lengths = cfg.eval.lengths or [block, 2 * block, 4 * block, 8 * block]
    datamodule = build_datamodule(run_cfg, tokenizer_json=tokenizer.to_str())
    datamodule.setup("validate")
    split = cfg.eval.split
    out = output_folder(cfg, Path(cfg.ckpt))
    settings = {k: v for k, v in vars(cfg.eval).items() if k != "lengths"}
    rows = run_extrapolation(model, datamodule.tokens[split], datamodule.bytes_per_token.get(split), out,
                             lengths=lengths, **settings)
    write_json(out / "extrapolation.json", {"ckpt": str(cfg.ckpt), "split": split, "rows": rows})

    table = Table(title=f"pos={model.pos.name}, trained at {block} tokens, {split} split")
    for column in ("length", "protocol", "loss", "ppl", "bpb", "tokens", "note"):
        table.add_column(column, justify="right" if column not in ("protocol", "note") else "left")
    for r in rows:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        table.add_row(str(r["length"]), r["protocol"], fmt(r["loss"]), fmt(r["ppl"]), fmt(r.get("bpb")),
                      str(r["tokens"]), r["note"])
    console = Console(soft_wrap=True)  # the written paths stay whole
    console.print(table)
    console.print(f"written: {out / 'extrapolation.csv'}, {out / 'extrapolation.png'}, {out / 'extrapolation.json'}")


@hydra.main(version_base="1.3", config_path="../configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    guard(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
