"""Generate text from a checkpoint folder alone, with the KV cache.

    python scripts/sample.py ckpt=runs/<run>/checkpoints/best.ckpt prompt="ROMEO:" max_new_tokens=500
"""

import torch

from dynpos.training.checkpoint import load_model
from dynpos.training.cli import guard, script_config

DEFAULTS = {"ckpt": "???", "prompt": "\n", "max_new_tokens": 500, "temperature": 0.8, "top_k": None,
            "num_samples": 1, "seed": 0}


def main() -> None:
    cfg = script_config(DEFAULTS)
    if cfg.top_k is not None and (isinstance(cfg.top_k, bool) or not isinstance(cfg.top_k, int)):
        raise ValueError(f"top_k must be a whole number or null, got top_k={cfg.top_k}")
    if cfg.num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got num_samples={cfg.num_samples}")
    model, tokenizer, _ = load_model(cfg.ckpt, "ckpt")
    ids = tokenizer.encode(str(cfg.prompt)).ids
    if not ids:
        raise ValueError(f"prompt={cfg.prompt!r} encodes to no tokens: give a non-empty prompt")
    generator = torch.Generator().manual_seed(int(cfg.seed))
    for n in range(int(cfg.num_samples)):
        out = model.generate(torch.tensor([ids]), int(cfg.max_new_tokens), temperature=float(cfg.temperature),
                             top_k=cfg.top_k, generator=generator)
        print(tokenizer.decode(out[0].tolist(), skip_special_tokens=False))
        if n + 1 < cfg.num_samples:
            print("-" * 40)


if __name__ == "__main__":
    guard(main)
