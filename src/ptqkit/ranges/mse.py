"""MSE-optimal clipping (eq. 1 of Hubara et al.) and the general Lp search it is a case of."""

from __future__ import annotations

import torch

from ..core.primitives import qparams_from_range, quantize_int
from ..core.spec import QuantSpec

__all__ = ["lp_search", "mse_range"]


@torch.no_grad()
def lp_search(x: torch.Tensor, spec: QuantSpec, p: float = 2.0,
              grid: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over a clipping factor a in (0, 1] of ||x - Q_a(x)||_p^p, per row.

    x: (C, N). The candidate range is a * [min, max] of each row (a 1-D search over the step
    size, scanned on ``grid`` points); returns (lo, hi), each (C,).
    """
    x = x.float()
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    row = QuantSpec(spec.bits, spec.symmetric, "channel", 0)
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for a in torch.linspace(1.0 / grid, 1.0, grid):
        scale, zp = qparams_from_range(lo * a, hi * a, row)
        xq = (quantize_int(x, scale, zp, row) - zp[:, None]) * scale[:, None]
        err = (xq - x).abs_().pow_(p).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * a, best_lo)
        best_hi = torch.where(better, hi * a, best_hi)
    return best_lo, best_hi


def mse_range(x: torch.Tensor, spec: QuantSpec, grid: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (C, N) -> MSE-optimal (lo, hi), each (C,)."""
    return lp_search(x, spec, 2.0, grid)
