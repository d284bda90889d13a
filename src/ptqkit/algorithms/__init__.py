"""Methods. Each module registers its Step in STEPS on import; import them all here."""

from __future__ import annotations

from . import (  # noqa: F401
    adaquant,
    bias_correction,
    bias_tuning,
    bit_allocation,
    block_reconstruction,
    bn_tuning,
    embeddings,
    equalization,
    int_outputs,
    lapq,
    mixed_precision,
    range_init,
)
from .base import STEPS, Context, Report, Step, register_step

__all__ = ["STEPS", "Context", "Report", "Step", "register_step"]
