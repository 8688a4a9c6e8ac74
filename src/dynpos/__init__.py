"""dynpos: train transformer language models with Dynamic Position Bias and ablate positional schemes."""

import os

# Idle OpenMP threads sleep instead of spinning, unless the user chose otherwise. Must be set before
# torch loads libgomp. On a machine shared with other jobs, spinning threads took the cores the
# others needed: a micro DPB step went from 388 ms (passive) to 2,794 ms (libgomp's default); idle,
# the two were within run-to-run noise (README, Performance: threads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dynpos.model.attention import KVCache  # noqa: E402
from dynpos.model.gpt import GPT, GPTConfig  # noqa: E402
from dynpos.positional.dpb import DynamicPositionBias  # noqa: E402

__all__ = ["GPT", "GPTConfig", "DynamicPositionBias", "KVCache"]
__version__ = "0.1.0"
