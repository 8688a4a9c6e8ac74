"""A decoder-only GPT, read top to bottom like nanoGPT's ``model.py`` (Karpathy): config, Block, GPT.
The one new idea: every block takes its positions from one scheme (``dynpos.positional``, DPB by
default), which adds an absolute embedding, rotates q and k, or biases the attention logits.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dynpos.model.attention import AttnChoice, CausalSelfAttention, KVCache, causal_mask, check_attn, choose_attention
from dynpos.positional.base import PositionalScheme, check_model_sizes, toeplitz
from dynpos.positional.dpb import DPB


@dataclass
class GPTConfig:
    """Model sizes: the schema of the ``model`` config group (Hydra's ConfigStore, ``dynpos.config``).
    Raises ValueError naming the ``model.<key>`` out of range."""

    vocab_size: int | None = None  # None: the tokenizer's (set by the pipeline); larger pads (nanoGPT's 50304)
    block_size: int = 128  # the training context length, in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128  # a multiple of n_head
    dropout: float = 0.0  # in [0, 1)
    bias: bool = True  # biases in Linear layers and LayerNorms (GPT-2)
    attn: str = "auto"  # auto | fused | sdpa | eager | flex: see dynpos.model.attention.choose_attention
    compile: bool = False  # torch.compile for training and evaluation

    def __post_init__(self) -> None:
        sizes = (("vocab_size",) if self.vocab_size is not None else ()) + ("block_size", "n_layer", "n_head", "n_embd")
        check_model_sizes(**{key: getattr(self, key) for key in sizes})
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
                             "choose n_embd a multiple of n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        check_attn(self.attn)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``, the MLP position-wise."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout, config.bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias), gelu=nn.GELU(),
            c_proj=nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias), dropout=nn.Dropout(config.dropout)))

    def forward(self, x: Tensor, pos: PositionalScheme, layer: int, path: str, bias: Tensor | None,
                cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), pos, layer, path, bias, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only language model with a pluggable positional scheme; the LM head shares the token
    embedding's weight (weight tying, Press & Wolf 2017).

    ``pos``: a factory ``(n_layer=, n_head=, n_embd=, block_size=) -> PositionalScheme``, a scheme
    class or a ``functools.partial`` of one (Hydra's ``_partial_`` of ``configs/pos/*.yaml``);
    default :class:`~dynpos.positional.dpb.DPB`. Raises ValueError if ``config.vocab_size`` is None.
    """

    def __init__(self, config: GPTConfig, pos: Callable[..., PositionalScheme] | None = None) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size is None: give the tokenizer's vocabulary size")
        self.config = config
        self.pos = (pos or DPB)(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                                block_size=config.block_size)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        for module in self.modules():  # GPT-2's init; the scheme keeps its own (PyTorch default) init
            if isinstance(module, (nn.Linear, nn.Embedding)) and module not in self.pos.modules():
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():  # then the residual projections' scaled init (GPT-2 paper)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def num_params(self) -> int:
        """Number of parameters (tied weights counted once), positional scheme included."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, t: int) -> float:
        """Training FLOPs per token at context length ``t``: ``6 N + 12 n_layer n_embd t`` (PaLM,
        Chowdhery et al. 2022, appendix B; the attention term in full, as nanoGPT's MFU estimate)."""
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * t

    def attention_choice(self, i: int, j: int, device: torch.device | str, cache: KVCache | None = None) -> AttnChoice:
        """:func:`~dynpos.model.attention.choose_attention` for ``i`` new tokens over ``j`` positions, now."""
        scheme = type(self.pos)
        bias = ("table" if scheme.table is not PositionalScheme.table else
                "grid" if scheme.bias is not PositionalScheme.bias else "none")
        learned = any(p.requires_grad for p in self.pos.parameters())
        return choose_attention(self.config.attn, bias=bias, learned=learned, device=device,
                                grad=torch.is_grad_enabled(), cached=cache is not None and i != j,
                                dropout=self.config.dropout if self.training else 0.0, length=j)

    def _layer_biases(self, path: str, i: int, j: int, dtype: torch.dtype, device: torch.device,
                      cache: KVCache | None = None) -> list[Tensor | None]:
        """Each block's ``bias`` as :meth:`CausalSelfAttention.forward` reads it on ``path``; decoding
        without gradients keeps the tables in the ``cache``."""
        decoding = cache is not None and i != j and not torch.is_grad_enabled()
        if decoding and (cache.tables is None or cache.tables[0] is not None and cache.tables[0].shape[1] < j):
            have = 0 if cache.tables is None else cache.tables[0].shape[1]
            cache.tables = self.pos.tables(max(self.config.block_size, j, 2 * have))
        tables = cache.tables if decoding else self.pos.tables(j)
        copies = 1 if self.pos.shared else self.config.n_layer  # a shared scheme: one tensor for every block
        if tables[0] is None:  # a grid (FIRE) or no bias
            grids = self.pos.biases(i, j)[:copies]
        elif path in ("fused", "flex"):  # they read the tables
            return tables
        else:
            grids = [toeplitz(t[:, :j], i) for t in tables[:copies]]
        if path != "flex":
            grids = [None if g is None else causal_mask(g, i, j, device, dtype) for g in grids]
        return grids * (self.config.n_layer // copies)

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None):
        """``(logits (B, t, vocab_size), loss)`` for token ids ``idx (B, t)`` (after the cached ones if
        a ``cache`` is given); ``loss``: mean cross-entropy in nats per token against ``targets (B, t)``
        (``-1`` ignored), None without. Raises ValueError past the length the scheme can encode.
        """
        t = idx.shape[1]
        offset = cache.length if cache is not None else 0
        j = offset + t
        if self.pos.max_length is not None and j > self.pos.max_length:
            raise ValueError(f"sequence of {j} tokens exceeds the {self.pos.max_length} positions that "
                             f"pos={self.pos.name} can encode: use a relative scheme (pos=dpb, alibi, rope, ...) or "
                             "evaluate at lengths <= block_size")
        x = self.wte(idx)
        absolute = self.pos.absolute(t, offset)
        if absolute is not None:
            x = x + absolute
        x = self.drop(x)
        path = self.attention_choice(t, j, x.device, cache).path
        for layer, (block, bias) in enumerate(zip(self.h, self._layer_biases(path, t, j, x.dtype, x.device, cache))):
            x = block(x, self.pos, layer, path, bias, cache)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay on weights with >= 2 dims (matmuls, embeddings), none on
        biases and norms (nanoGPT's rule, derived from dimensionality)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx (B, t)``: ``(B, t + max_new_tokens)`` token ids.

        Decodes through a KV cache; past ``block_size`` tokens each step recomputes the last
        ``block_size`` (as nanoGPT). ``forward`` is called directly: a compiled model decodes eagerly.
        Raises ValueError if ``temperature <= 0``, ``top_k`` is outside ``1 .. vocab_size`` or
        ``max_new_tokens < 0``.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature} (use a small value such as 1e-3 for greedy)")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k must be in 1..{self.config.vocab_size} (vocab_size), got {top_k}")
        block = self.config.block_size
        cache = KVCache(self.config.n_layer)
        logits, _ = self.forward(idx[:, -block:], cache=cache)
        for _ in range(max_new_tokens):
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                kth = torch.topk(logits, top_k).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits.float(), dim=-1)
            nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            if cache.length < block:
                logits, _ = self.forward(nxt, cache=cache)
            else:
                logits, _ = self.forward(idx[:, -block:])
        return idx


def compile_model(model: GPT, mode: str | None = None) -> GPT:
    """Compile ``model`` in place with ``torch.compile``'s ``mode`` and return it.

    Any fallback of the training and evaluation paths is reported first (nothing is logged while
    Dynamo traces). In place, so checkpoints carry no ``_orig_mod.`` prefix (nanoGPT #325, #351).
    """
    block, training = model.config.block_size, model.training
    device = next(model.parameters()).device
    for train in (True, False):
        model.train(train)
        with torch.set_grad_enabled(train):
            model.attention_choice(block, block, device)
    model.train(training)
    model.compile(mode=mode)
    return model
