"""Positional schemes, one module each behind :class:`PositionalScheme` (base.py); ``SCHEMES`` maps
each config name (``pos=<name>``, ``configs/pos/<name>.yaml``) to its class."""

from dynpos.positional.alibi import ALiBi, alibi_slopes
from dynpos.positional.base import PositionalScheme, check_option, check_sizes, toeplitz
from dynpos.positional.dpb import DPB, DynamicPositionBias
from dynpos.positional.fire import FIRE
from dynpos.positional.kerple import KERPLE
from dynpos.positional.learned import Learned
from dynpos.positional.nope import NoPE
from dynpos.positional.rope import RoPE
from dynpos.positional.sinusoidal import Sinusoidal
from dynpos.positional.t5 import T5, t5_bucket

SCHEMES: dict[str, type[PositionalScheme]] = {
    scheme.name: scheme for scheme in (DPB, ALiBi, RoPE, T5, Learned, Sinusoidal, NoPE, FIRE, KERPLE)
}

__all__ = [
    "PositionalScheme", "SCHEMES", "check_option", "check_sizes", "toeplitz",
    "DPB", "DynamicPositionBias", "ALiBi", "alibi_slopes", "RoPE", "T5", "t5_bucket",
    "Learned", "Sinusoidal", "NoPE", "FIRE", "KERPLE",
]
