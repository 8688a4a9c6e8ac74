"""The decoder-only GPT, its attention paths and KV cache."""

from dynpos.model.attention import KVCache
from dynpos.model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "KVCache"]
