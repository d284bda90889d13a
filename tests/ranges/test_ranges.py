from __future__ import annotations

import pytest
import torch

from ptqkit.core.primitives import fake_quantize, qparams_from_range
from ptqkit.core.spec import QuantSpec
from ptqkit.ranges import RANGE_METHODS, get_range_method
from ptqkit.ranges.lp import lp_range
from ptqkit.ranges.minmax import minmax_range
from ptqkit.ranges.mse import lp_search, mse_range
from ptqkit.ranges.percentile import percentile_range


def test_minmax_per_row() -> None:
    x = torch.tensor([[-1.0, 2.0, 0.5], [0.0, 3.0, -4.0]])
    lo, hi = minmax_range(x, QuantSpec(8))
    assert lo.tolist() == [-1.0, -4.0] and hi.tolist() == [2.0, 3.0]


def test_percentile_clips_tails() -> None:
    x = torch.cat([torch.linspace(-1, 1, 10001), torch.tensor([100.0])]).reshape(1, -1)
    lo, hi = percentile_range(x, QuantSpec(8), percentile=99.0)
    assert float(hi) == pytest.approx(0.98, abs=0.01) and float(lo) == pytest.approx(-0.98, abs=0.01)
    with pytest.raises(ValueError, match="percentile"):
        percentile_range(x, QuantSpec(8), percentile=20)


def _mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    row = QuantSpec(spec.bits, spec.symmetric, "channel", 0)
    s, z = qparams_from_range(lo, hi, row)
    return (fake_quantize(x, s, z, row) - x).pow(2).mean(1)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_range_is_no_worse_than_minmax_and_finds_clipping(bits: int) -> None:
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((3, 20000))  # heavy tails
    x[:, 0] = 40.0  # an outlier that min-max has to cover
    spec = QuantSpec(bits)
    lo, hi = mse_range(x, spec)
    mlo, mhi = minmax_range(x, spec)
    assert torch.all(_mse(x, lo, hi, spec) <= _mse(x, mlo, mhi, spec))
    if bits <= 4:
        assert torch.all(hi < 0.5 * mhi)  # the outlier is clipped at low bit widths


def test_lp_search_grid_is_exhaustive_on_its_grid() -> None:
    x = torch.randn(1, 5000)
    spec = QuantSpec(3)
    lo, hi = lp_search(x, spec, p=2.0, grid=20)
    mlo, mhi = minmax_range(x, spec)
    errs = [float(_mse(x, mlo * a, mhi * a, spec)) for a in torch.linspace(0.05, 1.0, 20)]
    assert float(_mse(x, lo, hi, spec)) == pytest.approx(min(errs), rel=1e-5)


def test_registry_errors() -> None:
    assert {"minmax", "percentile", "mse"} <= set(RANGE_METHODS)
    with pytest.raises(ValueError, match="unknown range method 'x'"):
        get_range_method("x")


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
