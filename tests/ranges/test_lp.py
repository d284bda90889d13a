from __future__ import annotations

import pytest
import torch

from ptqkit.core.primitives import fake_quantize, qparams_from_range
from ptqkit.core.spec import QuantSpec
from ptqkit.ranges import RANGE_METHODS
from ptqkit.ranges.lp import lp_range
from ptqkit.ranges.mse import mse_range


def _err(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, p: float) -> float:
    s, z = qparams_from_range(lo, hi, spec)
    return float((fake_quantize(x, s, z, spec) - x).abs().pow(p).sum())


def test_p2_is_the_mse_range() -> None:
    x = torch.randn(3, 1000)
    spec = QuantSpec(4, granularity="channel")
    for a, b in zip(lp_range(x, spec, p=2.0), mse_range(x, spec)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p", [2.0, 3.0, 4.0])
def test_lp_range_minimises_its_norm_over_the_grid(p: float) -> None:
    x = torch.randn(1, 5000) ** 3
    spec = QuantSpec(3)
    lo, hi = lp_range(x, spec, p=p)
    best = _err(x, lo, hi, spec, p)
    for a in torch.linspace(0.01, 1.0, 100):
        assert best <= _err(x, x.amin(1) * a, x.amax(1) * a, spec, p) * (1 + 1e-6)


def test_larger_p_clips_less() -> None:
    x = torch.randn(1, 20000) ** 3
    spec = QuantSpec(4)
    widths = [float(lp_range(x, spec, p=p)[1][0]) for p in (2.0, 3.0, 4.0)]
    assert widths[0] < widths[1] < widths[2]


def test_registered_and_bad_p() -> None:
    assert RANGE_METHODS["lp"] is lp_range
    with pytest.raises(ValueError, match="p > 0"):
        lp_range(torch.randn(1, 10), QuantSpec(4), p=0.0)
