"""The decoder-only GPT, its attention paths and KV cache."""

from dynpos.model.attention import KVCache, choose_attention
from dynpos.model.gpt import GPT, GPTConfig, compile_model

__all__ = ["GPT", "GPTConfig", "KVCache", "choose_attention", "compile_model"]
