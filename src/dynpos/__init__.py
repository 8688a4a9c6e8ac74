"""dynpos: train transformer language models with Dynamic Position Bias and ablate positional schemes."""

import os

# Idle OpenMP threads sleep instead of spinning (set before torch loads libgomp): on a shared machine a micro
# DPB step took 388 ms instead of 2,794 ms; idle, within noise (README, Performance: threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dynpos.model.attention import KVCache  # noqa: E402
from dynpos.model.gpt import GPT, GPTConfig  # noqa: E402
from dynpos.positional.dpb import DynamicPositionBias  # noqa: E402

__all__ = ["GPT", "GPTConfig", "DynamicPositionBias", "KVCache"]
__version__ = "0.1.0"
