"""Generate text from a checkpoint alone, with the KV cache.

    python scripts/sample.py ckpt=runs/<run>/checkpoints/best.ckpt prompt="ROMEO:" max_new_tokens=500

Keys: configs/sample.yaml (``--help`` lists them).
"""

import hydra
import torch
from omegaconf import DictConfig
from rich.console import Console

from dynpos.config import register, validate
from dynpos.training.checkpoint import load_model
from dynpos.training.cli import guard

register()


def sample(cfg: DictConfig) -> None:
    """Print ``num_samples`` continuations of ``prompt``; characters the tokenizer lacks are named once."""
    cfg = validate(cfg)
    model, tokenizer, _ = load_model(cfg.ckpt, "ckpt")
    encoding = tokenizer.encode(cfg.prompt)
    if not encoding.ids:
        raise ValueError(f"prompt={cfg.prompt!r} encodes to no tokens: give a non-empty prompt")
    unknown = sorted({cfg.prompt[a:b] for (a, b), t in zip(encoding.offsets, encoding.tokens) if t == "<unk>"})
    if unknown:
        Console(stderr=True, soft_wrap=True).print(f"note: the tokenizer has no token for {', '.join(map(repr, unknown))}: "
                                   "they reach the model as <unk> and print as <unk>")
    generator = torch.Generator().manual_seed(cfg.seed)
    for n in range(cfg.num_samples):
        out = model.generate(torch.tensor([encoding.ids]), cfg.max_new_tokens, temperature=cfg.temperature,
                             top_k=cfg.top_k, generator=generator)
        print(tokenizer.decode(out[0].tolist(), skip_special_tokens=False))
        if n + 1 < cfg.num_samples:
            print("-" * 40)


@hydra.main(version_base="1.3", config_path="../configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    guard(lambda: sample(cfg))


if __name__ == "__main__":
    main()
