"""dynpos: train transformer language models with Dynamic Position Bias and ablate positional schemes."""

import os

# An idle OpenMP thread of libgomp (torch's OpenMP runtime on Linux) spins GOMP_SPINCOUNT times
# (default 300,000: milliseconds) before it sleeps, and the fused attention's worker threads run
# beside it: on 2 cores the spin took a core from them and made a block-256 DPB training step
# 1.6x NoPE instead of 1.2x (dynpos.model.fused, "Threads"). libgomp reads the value once, when
# torch loads, so this takes effect only when dynpos is imported before torch, as train.py and
# the scripts do. A value already in the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from dynpos.model.attention import KVCache  # noqa: E402
from dynpos.model.gpt import GPT, GPTConfig  # noqa: E402
from dynpos.positional.dpb import DynamicPositionBias  # noqa: E402

__all__ = ["GPT", "GPTConfig", "DynamicPositionBias", "KVCache"]
__version__ = "0.1.0"
