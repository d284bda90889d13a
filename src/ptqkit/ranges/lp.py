"""Lp-norm clipping: argmin over the clipping range of ||X - Q(X)||_p^p (Nahshan et al., LAPQ
section 3.1). p = 2 is the MSE range; larger p penalises large errors more and clips less."""

from __future__ import annotations

import math

import torch

from ..core.spec import QuantSpec
from .mse import lp_search

__all__ = ["DEFAULT_P", "lp_range"]

# Middle of the p grid LAPQ searches (about 2..4); LAPQ itself searches p per model.
DEFAULT_P = 3.0


def lp_range(x: torch.Tensor, spec: QuantSpec, p: float = DEFAULT_P,
             grid: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (C, N) -> Lp-optimal (lo, hi), each (C,), from a 1-D search over a * [min, max]."""
    if not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0):
        raise ValueError(f"the Lp range needs a finite p > 0 (LAPQ uses about 2..4), got {p!r}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    return lp_search(x, spec, float(p), grid)
