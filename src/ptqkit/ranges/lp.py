"""Lp-norm clipping: argmin over the clipping range of ||X - Q(X)||_p^p (Nahshan et al., LAPQ
section 3.1). p = 2 is the MSE range; larger p penalises large errors more and clips less."""

from __future__ import annotations

import math

import torch

from ..core.primitives import qparams_from_range, quantize_int
from ..core.spec import QuantSpec

__all__ = ["DEFAULT_P", "lp_range", "lp_search_refined"]

# Middle of the p grid LAPQ searches (about 2..4); LAPQ itself searches p per model.
DEFAULT_P = 3.0


@torch.no_grad()
def lp_search_refined(x: torch.Tensor, spec: QuantSpec, p: float, coarse: int = 20,
                      fine: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin over a clipping factor a in (0, 1] of ||x - Q_a(x)||_p^p per row, range a*[min, max].

    x: (C, N) -> (lo, hi), each (C,). A coarse grid of ``coarse`` points, then ``fine`` points
    within one coarse step around each row's best: resolution 2 / (coarse * fine) with
    coarse + fine error evaluations (a 100-point grid needs 100 for 1/100).
    """
    x = x.float()
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    row = QuantSpec(spec.bits, spec.symmetric, "channel", 0)

    def err(a: torch.Tensor) -> torch.Tensor:
        scale, zp = qparams_from_range(lo * a, hi * a, row)
        xq = (quantize_int(x, scale, zp, row) - zp[:, None]) * scale[:, None]
        return (xq - x).abs_().pow_(p).sum(dim=1)

    best_a = torch.ones_like(lo)
    best_e = err(best_a)
    candidates = [torch.full_like(lo, float(a)) for a in torch.linspace(1.0 / coarse, 1.0, coarse)]
    for phase in range(2):
        for a in candidates:
            e = err(a)
            better = e < best_e
            best_e, best_a = torch.where(better, e, best_e), torch.where(better, a, best_a)
        if phase == 0:
            centre = best_a.clone()
            offsets = torch.linspace(-1.0 / coarse, 1.0 / coarse, fine)
            candidates = [(centre + o).clamp(1e-3, 1.0) for o in offsets]
    return lo * best_a, hi * best_a


def lp_range(x: torch.Tensor, spec: QuantSpec, p: float = DEFAULT_P, coarse: int = 20,
             fine: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (C, N) -> Lp-optimal (lo, hi), each (C,), from a coarse-to-fine search over
    a * [min, max] (``lp_search_refined``)."""
    if not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0):
        raise ValueError(f"the Lp range needs a finite p > 0 (LAPQ uses about 2..4), got {p!r}")
    if coarse < 1 or fine < 1:
        raise ValueError(f"coarse and fine must be >= 1, got {coarse}, {fine}")
    return lp_search_refined(x, spec, float(p), coarse, fine)
