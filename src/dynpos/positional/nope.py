"""NoPE: no positional encoding; the causal mask alone carries order.

Source: Kazemnejad et al. (2023), "The Impact of Positional Encoding on Length Generalization in
Transformers" (NeurIPS).
"""

from __future__ import annotations

from dynpos.positional.base import PositionalScheme


class NoPE(PositionalScheme):
    """No positional information (``pos=nope``): every hook keeps the base class's no-op default."""
