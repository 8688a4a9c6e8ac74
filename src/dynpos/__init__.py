"""dynpos: train transformer language models with Dynamic Position Bias and ablate positional schemes."""

from dynpos.model.attention import KVCache
from dynpos.model.gpt import GPT, GPTConfig
from dynpos.positional.dpb import DynamicPositionBias

__all__ = ["GPT", "GPTConfig", "DynamicPositionBias", "KVCache"]
__version__ = "0.1.0"
