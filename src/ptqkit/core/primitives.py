"""Pure quantization primitives (no state, no hooks).

Conventions follow torch.fake_quantize_per_{tensor,channel}_affine so results are bit-exact:
q = clamp(zero_point + round_half_even(x * (1 / scale)), qmin, qmax); x_hat = (q - zero_point) * scale.
"""

from __future__ import annotations

import torch

from .spec import QuantSpec

__all__ = ["round_ste", "fake_quantize", "quantize_int", "qparams_from_range", "broadcast_shape"]

EPS = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def broadcast_shape(x: torch.Tensor, axis: int) -> list[int]:
    """Shape that broadcasts a per-channel vector along ``axis`` of ``x``."""
    shape = [1] * x.dim()
    shape[axis] = -1
    return shape


def _expand(t: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.per_channel and t.numel() > 1:
        return t.reshape(broadcast_shape(x, spec.axis))
    return t.reshape(()) if t.numel() == 1 else t


Bounds = tuple[torch.Tensor, torch.Tensor]


def _clamp_codes(q: torch.Tensor, spec: QuantSpec, bounds: Bounds | None) -> torch.Tensor:
    """Clamp codes to the spec's grid, or to per-channel (qmin (C,), qmax (C,)) inside it."""
    if bounds is None:
        return torch.clamp(q, spec.qmin, spec.qmax)
    return torch.clamp(q, _expand(bounds[0], q, spec), _expand(bounds[1], q, spec))


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 spec: QuantSpec, bounds: Bounds | None = None) -> torch.Tensor:
    """Integer codes (as float) of ``x``: shape of ``x``; scale/zero_point scalar or (C,).
    ``bounds``: optional per-channel code range (fewer levels on some channels)."""
    s, z = _expand(scale, x, spec), _expand(zero_point, x, spec)
    return _clamp_codes(torch.round(x * (1.0 / s)) + z, spec, bounds)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  spec: QuantSpec, bounds: Bounds | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` with straight-through rounding.

    Gradients flow to ``x`` (inside the clipping range), to ``scale`` and to ``zero_point``
    (as in LSQ/LSQ+); ``zero_point`` is rounded to an integer in the forward pass.
    """
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad
                                         or zero_point.requires_grad)):
        return _fake_quantize_no_grad(x, scale, zero_point, spec, bounds)
    s, z = _expand(scale, x, spec), _expand(round_ste(zero_point), x, spec)
    q = _clamp_codes(round_ste(x * (1.0 / s)) + z, spec, bounds)
    return (q - z) * s


def _fake_quantize_no_grad(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                           spec: QuantSpec, bounds: Bounds | None) -> torch.Tensor:
    """The forward of ``fake_quantize`` without autograd: the same operations in the same order
    (bit-identical), applied in place on one buffer. On CPU this is about 2.5x faster than
    torch.fake_quantize_per_tensor_affine on large activations, which also builds a mask."""
    s = _expand(scale.detach(), x, spec)
    z = _expand(torch.round(zero_point.detach()), x, spec)
    q = x.detach() * (1.0 / s)
    q.round_().add_(z)
    if bounds is None:
        q.clamp_(spec.qmin, spec.qmax)
    else:
        q.clamp_(_expand(bounds[0], q, spec), _expand(bounds[1], q, spec))
    return q.sub_(z).mul_(s)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor,
                       spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero-point that represent [lo, hi] (widened to include 0).

    lo, hi: scalars or (C,) tensors. Symmetric: scale = max(|lo|, |hi|) / ((qmax - qmin) / 2),
    zero-point 0. Asymmetric: scale = (hi - lo) / (qmax - qmin), zero-point = qmin - round(lo / scale)
    clamped to the grid, so that 0.0 is represented exactly.
    """
    lo = torch.minimum(torch.as_tensor(lo, dtype=torch.float32), torch.zeros(()))
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.float32), torch.zeros(()))
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / ((spec.qmax - spec.qmin) / 2)
        scale = torch.clamp(scale, min=EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (spec.qmax - spec.qmin), min=EPS)
    zero_point = torch.clamp(spec.qmin - torch.round(lo / scale), spec.qmin, spec.qmax)
    return scale, zero_point
