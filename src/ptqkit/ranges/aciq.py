"""ACIQ: analytical clipping for integer quantization (Banner et al., "Post-training 4-bit
quantization of convolutional networks for rapid-deployment", section 3).

Each row of the data is modelled as a Laplace(mu, b) or Gaussian(mu, sigma) and clipped at the
alpha that minimises the expected quantization noise of M bits,

    E(alpha) = clip(alpha) + alpha^2 / (3 * 4^M),
    Laplace:  clip(alpha) = 2 b^2 exp(-alpha / b)
    Gaussian: clip(alpha) = (alpha^2 + sigma^2) erfc(alpha / (sqrt(2) sigma))
                            - sqrt(2 / pi) alpha sigma exp(-alpha^2 / (2 sigma^2)),

whose minimiser is alpha* = c_M * b (or c_M * sigma) with c_M in the tables below (checked
against a numerical minimiser in tests/ranges/test_aciq.py).

One-sided data (post-ReLU inputs, every value >= 0): the prior is fitted on the non-zero half
(an exponential for Laplace, a half-normal for Gaussian) and the grid covers [0, alpha]; with
2^M levels on [0, alpha] the noise is the two-sided expression for M + 1 bits, so the table is
read at M + 1.
"""

from __future__ import annotations

import math

import torch

from ..core.spec import QuantSpec
from .minmax import minmax_range

__all__ = ["PRIORS", "ALPHA_LAPLACE", "ALPHA_GAUSSIAN", "optimal_alpha", "clipping_noise",
           "expected_noise", "fit_prior", "aciq_range"]

PRIORS = ("laplace", "gaussian", "auto")

# alpha* / b (Laplace) and alpha* / sigma (Gaussian) for M = 2..9 bits. M = 9 serves one-sided
# 8-bit tensors. (CalibTIP's copy of this table is shifted by one bit.)
ALPHA_LAPLACE: dict[int, float] = {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89,
                                   9: 11.16}
ALPHA_GAUSSIAN: dict[int, float] = {2: 1.71, 3: 2.15, 4: 2.55, 5: 2.94, 6: 3.29, 7: 3.61, 8: 3.92,
                                    9: 4.22}

# Mean log-likelihood thresholds of the maximum-likelihood fits (see _prefers_laplace).
_TWO_SIDED_RATIO = math.sqrt(math.pi / (2.0 * math.e))  # b / sigma below this: Laplace fits better
_ONE_SIDED_RATIO = math.sqrt(2.0 * math.e / math.pi)  # rms / mean above this: exponential fits better


def _check_prior(prior: str) -> None:
    if prior not in PRIORS:
        raise ValueError(f"unknown ACIQ prior {prior!r}; expected one of {PRIORS} "
                         "(e.g. prior='auto' picks the better-fitting one per tensor)")


def optimal_alpha(bits: int, prior: str) -> float:
    """alpha* in units of the prior's scale (b for Laplace, sigma for Gaussian) for ``bits``."""
    if prior not in ("laplace", "gaussian"):
        raise ValueError(f"optimal_alpha needs prior 'laplace' or 'gaussian', got {prior!r}")
    table = ALPHA_LAPLACE if prior == "laplace" else ALPHA_GAUSSIAN
    if bits not in table:
        raise ValueError(f"ACIQ has clipping constants for {min(table)}..{max(table)} bits, "
                         f"got {bits}")
    return table[bits]


def clipping_noise(alpha: float, prior: str, scale: float = 1.0) -> float:
    """Closed-form clipping noise E[(X - clip(X, -alpha, alpha))^2] of a zero-mean prior."""
    if prior == "laplace":
        return 2.0 * scale**2 * math.exp(-alpha / scale)
    if prior == "gaussian":
        t = alpha / scale
        return scale**2 * ((t * t + 1.0) * math.erfc(t / math.sqrt(2.0))
                           - math.sqrt(2.0 / math.pi) * t * math.exp(-t * t / 2.0))
    raise ValueError(f"clipping_noise needs prior 'laplace' or 'gaussian', got {prior!r}")


def expected_noise(alpha: float, bits: int, prior: str, scale: float = 1.0) -> float:
    """Banner's eq.: clipping noise + rounding noise alpha^2 / (3 * 4^M) for a 2^M-level grid."""
    return clipping_noise(alpha, prior, scale) + alpha**2 / (3.0 * 4.0**bits)


def fit_prior(x: torch.Tensor, one_sided: bool) -> dict[str, torch.Tensor]:
    """Per-row maximum-likelihood-style fit; x: (C, N) -> dict of (C,) tensors.

    Two-sided: mu = mean, b = mean |x - mu| (mean absolute deviation), sigma = std.
    One-sided: on the values > 0 of each row, mu = 0, b = mean (exponential), sigma = rms
    (half-normal).
    """
    x = x.float()
    if one_sided:
        mask = x > 0
        count = mask.sum(dim=1).clamp(min=1)
        pos = torch.where(mask, x, torch.zeros(()))
        b = pos.sum(dim=1) / count
        sigma = (pos.pow(2).sum(dim=1) / count).sqrt()
        return {"mu": torch.zeros_like(b), "b": b, "sigma": sigma}
    mu = x.mean(dim=1)
    b = (x - mu[:, None]).abs().mean(dim=1)
    sigma = (x - mu[:, None]).pow(2).mean(dim=1).sqrt()
    return {"mu": mu, "b": b, "sigma": sigma}


def _prefers_laplace(fit: dict[str, torch.Tensor], one_sided: bool) -> torch.Tensor:
    """Which fit has the higher mean log-likelihood, per row (bool (C,)).

    Two-sided: Laplace -log(2b) - 1 vs Gaussian -log(sigma sqrt(2 pi e)) -> b/sigma < sqrt(pi/(2e)).
    One-sided: exponential -log(b) - 1 vs half-normal -log(sigma sqrt(pi e / 2)) ->
    sigma/b > sqrt(2e/pi).
    """
    b, sigma = fit["b"], fit["sigma"].clamp(min=1e-12)
    if one_sided:
        return sigma > _ONE_SIDED_RATIO * b
    return b < _TWO_SIDED_RATIO * sigma


def _alphas(fit: dict[str, torch.Tensor], bits: int, prior: str, one_sided: bool) -> torch.Tensor:
    lap = optimal_alpha(bits, "laplace") * fit["b"]
    gau = optimal_alpha(bits, "gaussian") * fit["sigma"]
    if prior == "laplace":
        return lap
    if prior == "gaussian":
        return gau
    return torch.where(_prefers_laplace(fit, one_sided), lap, gau)


@torch.no_grad()
def aciq_range(x: torch.Tensor, spec: QuantSpec, prior: str = "auto",
               one_sided: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ACIQ clipping range per row: x (C, N) -> (lo, hi), each (C,).

    prior: 'laplace', 'gaussian' or 'auto' (the better fit by likelihood, per row). one_sided:
    None detects it (the whole tensor >= 0, e.g. after ReLU). A two-sided row is clipped to
    [mu - alpha, mu + alpha] (mu = 0 on a symmetric grid), a one-sided row to [0, alpha]; never
    wider than the observed [min, max]. Bits above the table (16) fall back to min-max.
    """
    _check_prior(prior)
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"aciq_range expects a non-empty (C, N) tensor, got shape {tuple(x.shape)}")
    if spec.bits > 8:
        return minmax_range(x, spec)
    x = x.float()
    lo, hi = x.amin(dim=1), x.amax(dim=1)
    if one_sided is None:
        one_sided = bool((lo >= 0).all())
    if one_sided:
        # 2^M levels on [0, alpha] (asymmetric grid) behave like M + 1 two-sided bits; a
        # symmetric grid spends half its levels on negatives, leaving M.
        fit = fit_prior(x, one_sided=True)
        alpha = _alphas(fit, spec.bits + (0 if spec.symmetric else 1), prior, True)
        return lo, torch.minimum(alpha, hi)
    if spec.symmetric:
        fit = {"mu": torch.zeros_like(lo), "b": x.abs().mean(dim=1), "sigma": x.pow(2).mean(1).sqrt()}
    else:
        fit = fit_prior(x, one_sided=False)
    alpha = _alphas(fit, spec.bits, prior, False)
    return torch.maximum(fit["mu"] - alpha, lo), torch.minimum(fit["mu"] + alpha, hi)
