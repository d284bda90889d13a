"""Min-max range: the full observed range per row."""

from __future__ import annotations

import torch

from ..core.spec import QuantSpec

__all__ = ["minmax_range"]


def minmax_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (C, N) values per channel (C=1 for per-tensor) -> (lo, hi), each (C,)."""
    return x.amin(dim=1), x.amax(dim=1)
