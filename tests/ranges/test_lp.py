from __future__ import annotations

import pytest
import torch

from ptqkit.core.primitives import fake_quantize, qparams_from_range
from ptqkit.core.spec import QuantSpec
from ptqkit.ranges import RANGE_METHODS
from ptqkit.ranges.lp import lp_range
from ptqkit.ranges.mse import lp_search


def _err(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, p: float) -> float:
    s, z = qparams_from_range(lo, hi, spec)
    return float((fake_quantize(x, s, z, spec) - x).abs().pow(p).sum())


@pytest.mark.parametrize("p", [2.0, 2.5, 4.0])
def test_refined_search_is_as_good_as_a_dense_grid(p: float) -> None:
    x = torch.randn(1, 5000) ** 3
    spec = QuantSpec(3)
    ours = _err(x, *lp_range(x, spec, p=p), spec, p)
    dense = _err(x, *lp_search(x, spec, p, 400), spec, p)
    assert ours <= dense * 1.01


def test_per_channel_rows_are_independent() -> None:
    x = torch.randn(3, 2000) ** 3 * torch.tensor([[0.1], [1.0], [10.0]])
    spec = QuantSpec(4, granularity="channel")
    lo, hi = lp_range(x, spec, p=3.0)
    for c in range(3):
        lo_c, hi_c = lp_range(x[c:c + 1], spec, p=3.0)
        assert float(lo_c[0]) == float(lo[c]) and float(hi_c[0]) == float(hi[c])


def test_larger_p_clips_less() -> None:
    x = torch.randn(1, 20000) ** 3
    spec = QuantSpec(4)
    widths = [float(lp_range(x, spec, p=p)[1][0]) for p in (2.0, 3.0, 4.0)]
    assert widths[0] < widths[1] < widths[2]


def test_registered_and_bad_p() -> None:
    assert RANGE_METHODS["lp"] is lp_range
    with pytest.raises(ValueError, match="p > 0"):
        lp_range(torch.randn(1, 10), QuantSpec(4), p=0.0)
