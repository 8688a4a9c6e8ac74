"""NoPE: no positional encoding at all.

Source: Kazemnejad et al. (2023), "The Impact of Positional Encoding on Length Generalization in
Transformers" (NeurIPS). A decoder-only Transformer needs no explicit positions: the causal mask
alone lets it infer them (the paper proves it can represent absolute and relative positions), and
it length-generalises better than several explicit schemes on their tasks.

The scheme overrides none of the hooks: no absolute embedding, no rotation, no bias, no parameters.
"""

from __future__ import annotations

from dynpos.positional.base import PositionalScheme


class NoPE(PositionalScheme):
    """No positional information (``pos=nope``): every hook keeps the base class's no-op default.

    Args:
        n_layer, n_head, n_embd, block_size: the model's sizes (filled in by the model).
    """

    name = "nope"
