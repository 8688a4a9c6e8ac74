"""Train short, test long: loss and bits per byte of a checkpoint at each evaluation length.

    python scripts/evaluate.py ckpt=runs/<run>/checkpoints/best.ckpt eval.lengths=[128,256,512,1024]
    python scripts/evaluate.py ckpt=... eval.lengths=[256,2048] eval.protocol=both eval.stride=64

Uses the checkpoint's own data config and tokenizer; writes extrapolation.csv, .png and .json
into ``out`` (default ``<run>/eval``) and prints the table.
"""

import tempfile
from pathlib import Path

from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from dynpos.evaluation.extrapolate import run_extrapolation
from dynpos.training.checkpoint import CheckpointError, load_checkpoint, load_model
from dynpos.training.cli import guard, script_config
from dynpos.training.run import build_datamodule, write_json

DEFAULTS = {
    "ckpt": "???",
    "out": "",
    "attn": "",                   # override the attention path (auto | fused | sdpa | eager | flex); empty: the checkpoint's
    "eval": {"lengths": [256, 512, 1024, 2048], "protocol": "nonoverlap", "stride": None,
             "split": "validation", "max_tokens": 32768, "batch_size": 8},
}


def main() -> None:
    cfg = script_config(DEFAULTS)
    lengths = cfg.eval.lengths
    if not lengths or any(not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"eval.lengths={OmegaConf.to_container(lengths)} must be a non-empty list of positive ints")
    checkpoint = load_checkpoint(cfg.ckpt, "ckpt")
    if "config" not in checkpoint:
        raise CheckpointError(f"ckpt={cfg.ckpt}: holds no training config (written by an older dynpos): retrain")
    model, tokenizer, _ = load_model(cfg.ckpt, "ckpt")
    if cfg.attn:
        model.config.attn = str(cfg.attn)
    run_cfg = OmegaConf.create(checkpoint["config"])
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_path = str(Path(tmp) / "tokenizer.json")
        tokenizer.save(tokenizer_path)
        datamodule = build_datamodule(run_cfg, tokenizer_path=tokenizer_path)
        datamodule.setup("validate")
    split = cfg.eval.split
    if split not in datamodule.tokens:
        raise ValueError(f"eval.split={split!r}: choose one of {', '.join(datamodule.tokens)}")
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).resolve().parent.parent / "eval"
    rows = run_extrapolation(model, datamodule.tokens[split], datamodule.bytes_per_token.get(split), out,
                             **OmegaConf.to_container(cfg.eval, resolve=True))
    write_json(out / "extrapolation.json", {"ckpt": str(cfg.ckpt), "split": split, "rows": rows})

    table = Table(title=f"pos={model.pos.name}, trained at {model.config.block_size} tokens, {split} split")
    for column in ("length", "protocol", "loss", "ppl", "bpb", "tokens", "note"):
        table.add_column(column, justify="right" if column not in ("protocol", "note") else "left")
    for r in rows:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        table.add_row(str(r["length"]), r["protocol"], fmt(r["loss"]), fmt(r["ppl"]), fmt(r["bpb"]),
                      str(r["tokens"]), r["note"])
    console = Console(soft_wrap=True)  # the written paths stay whole
    console.print(table)
    console.print(f"written: {out / 'extrapolation.csv'}, {out / 'extrapolation.png'}, {out / 'extrapolation.json'}")


if __name__ == "__main__":
    guard(main)
