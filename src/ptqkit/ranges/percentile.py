"""Percentile range: clip the tails at a fixed percentile."""

from __future__ import annotations

import torch

from ..core.spec import QuantSpec

__all__ = ["percentile_range"]


def percentile_range(x: torch.Tensor, spec: QuantSpec,
                     percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (C, N) -> (lo, hi) at the (100 - p) and p percentiles of each row, each (C,)."""
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], dtype=x.dtype)
    # torch.quantile is limited to 2^24 elements per call; our samples are smaller.
    lohi = torch.quantile(x.float(), q, dim=1)
    return lohi[0], lohi[1]
