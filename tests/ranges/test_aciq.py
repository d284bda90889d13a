from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate, optimize, stats

from ptqkit.core.primitives import fake_quantize, qparams_from_range
from ptqkit.core.spec import QuantSpec
from ptqkit.pipeline import Recipe
from ptqkit.ranges import RANGE_METHODS, get_range_method
from ptqkit.ranges.aciq import (
    ALPHA_GAUSSIAN,
    ALPHA_LAPLACE,
    aciq_range,
    clipping_noise,
    fit_prior,
    optimal_alpha,
)

DENSITY = {"laplace": lambda x: 0.5 * math.exp(-abs(x)), "gaussian": stats.norm.pdf}


def _numeric_noise(alpha: float, bits: int, prior: str) -> float:
    """Clipping noise by quadrature of the density (independent of the closed forms)."""
    tail = integrate.quad(lambda x: (x - alpha) ** 2 * DENSITY[prior](x), alpha, math.inf)[0]
    return 2.0 * tail + alpha**2 / (3.0 * 4.0**bits)


@pytest.mark.parametrize("prior,table", [("laplace", ALPHA_LAPLACE), ("gaussian", ALPHA_GAUSSIAN)])
def test_alpha_table_matches_numerical_minimiser(prior: str, table: dict[int, float]) -> None:
    for bits, alpha in table.items():
        res = optimize.minimize_scalar(_numeric_noise, bounds=(0.1, 20.0), args=(bits, prior),
                                       method="bounded", options={"xatol": 1e-6})
        assert abs(res.x - alpha) <= 0.01, (prior, bits, res.x, alpha)


@pytest.mark.parametrize("prior", ["laplace", "gaussian"])
@pytest.mark.parametrize("alpha", [0.5, 2.0, 4.0])
def test_closed_form_clipping_noise_matches_quadrature(prior: str, alpha: float) -> None:
    numeric = _numeric_noise(alpha, 30, prior)  # rounding term negligible at 30 bits
    assert clipping_noise(alpha, prior) == pytest.approx(numeric, rel=1e-6, abs=1e-12)


def _laplace(n: int, b: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g) - 0.5
    return -b * u.sign() * torch.log1p(-2 * u.abs())


def test_laplace_fit_and_range_follow_the_table() -> None:
    x = _laplace(200_000, b=0.5)[None]
    fit = fit_prior(x, one_sided=False)
    assert float(fit["b"][0]) == pytest.approx(0.5, rel=0.01)
    lo, hi = aciq_range(x, QuantSpec(4), prior="laplace")
    mu = float(x.mean())
    assert float(hi[0]) == pytest.approx(mu + 5.03 * float(fit["b"][0]), rel=1e-5)
    assert float(lo[0]) == pytest.approx(mu - 5.03 * float(fit["b"][0]), rel=1e-5)


def test_auto_picks_the_better_fitting_prior() -> None:
    lap = _laplace(100_000, 1.0)
    gau = torch.randn(100_000, generator=torch.Generator().manual_seed(1))
    x = torch.stack([lap, gau])
    lo, hi = aciq_range(x, QuantSpec(3, granularity="channel"), prior="auto")
    fit = fit_prior(x, one_sided=False)
    assert float(hi[0] - fit["mu"][0]) == pytest.approx(3.89 * float(fit["b"][0]), rel=1e-5)
    assert float(hi[1] - fit["mu"][1]) == pytest.approx(2.15 * float(fit["sigma"][1]), rel=1e-5)


def _mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> float:
    s, z = qparams_from_range(lo, hi, spec)
    return float((fake_quantize(x, s, z, spec) - x).pow(2).mean())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_aciq_beats_minmax_on_laplace_data(bits: int) -> None:
    x = _laplace(50_000, 1.0)[None]
    spec = QuantSpec(bits)
    assert _mse(x, *aciq_range(x, spec), spec) < 0.5 * _mse(x, *RANGE_METHODS["minmax"](x, spec), spec)


@pytest.mark.parametrize("bits", [2, 4])
def test_one_sided_uses_the_next_table_entry_and_is_near_optimal(bits: int) -> None:
    x = torch.relu(_laplace(200_000, 1.0))[None]  # half zeros, half Exp(1)
    spec = QuantSpec(bits)
    lo, hi = aciq_range(x, spec, prior="laplace")
    b = float(x[x > 0].mean())
    assert float(lo[0]) == 0.0 and float(hi[0]) == pytest.approx(ALPHA_LAPLACE[bits + 1] * b, rel=1e-5)
    # the chosen alpha is within 10% of the empirical MSE-optimal clipping point
    alphas = torch.linspace(0.3, 1.5, 49) * float(hi[0])
    errs = [_mse(x, torch.zeros(1), a.reshape(1), spec) for a in alphas]
    best = float(alphas[int(torch.tensor(errs).argmin())])
    assert best == pytest.approx(float(hi[0]), rel=0.1)
    assert errs[24] <= 1.1 * min(errs)  # the formula assumes 2^M intervals, the grid has 2^M - 1


def test_per_channel_rows_scale_with_their_spread() -> None:
    base = _laplace(4096, 1.0)
    w = torch.stack([base * s for s in (0.1, 1.0, 3.0)])
    lo, hi = aciq_range(w, QuantSpec(4, granularity="channel"), prior="laplace")
    assert torch.allclose(hi / hi[1], torch.tensor([0.1, 1.0, 3.0]), rtol=1e-4)
    assert (hi <= w.amax(1)).all() and (lo >= w.amin(1)).all()


def test_never_wider_than_the_data_and_high_bits_fall_back_to_minmax() -> None:
    x = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    lo, hi = aciq_range(x, QuantSpec(8))
    assert float(lo[0]) >= -1.0 and float(hi[0]) <= 1.0
    lo, hi = aciq_range(x, QuantSpec(16))
    assert (float(lo[0]), float(hi[0])) == (-1.0, 1.0)


def test_symmetric_grid_is_centred_at_zero() -> None:
    x = (_laplace(50_000, 1.0) + 0.3)[None]
    lo, hi = aciq_range(x, QuantSpec(4, symmetric=True), prior="laplace")
    b0 = float(x.abs().mean())
    assert float(hi[0]) == pytest.approx(5.03 * b0, rel=1e-5)


def test_bad_input_is_a_clear_error() -> None:
    x = torch.randn(1, 100)
    with pytest.raises(ValueError, match="unknown ACIQ prior 'cauchy'"):
        aciq_range(x, QuantSpec(4), prior="cauchy")
    with pytest.raises(ValueError, match="2..9 bits"):
        optimal_alpha(10, "laplace")
    with pytest.raises(ValueError, match=r"\(C, N\)"):
        aciq_range(torch.randn(100), QuantSpec(4))
    with pytest.raises(ValueError, match="unknown range method 'acq'"):
        get_range_method("acq")


def test_registered_and_usable_from_a_recipe() -> None:
    assert RANGE_METHODS["aciq"] is aciq_range
    r = Recipe(w_bits=4, a_bits=4, w_range="aciq", a_range="aciq")
    assert Recipe.from_dict(r.to_dict()) == r
