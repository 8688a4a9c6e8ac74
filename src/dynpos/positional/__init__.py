"""Positional schemes, one module each, all behind :class:`PositionalScheme` (see base.py)."""

from dynpos.positional.base import PositionalScheme, toeplitz
from dynpos.positional.dpb import DPB, DynamicPositionBias

__all__ = ["PositionalScheme", "toeplitz", "DPB", "DynamicPositionBias"]
