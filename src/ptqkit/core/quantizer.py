"""Quantizer module: a fake-quantizer with a learnable step size and zero-point."""

from __future__ import annotations

import torch
from torch import nn

from .primitives import EPS, fake_quantize, qparams_from_range, quantize_int
from .spec import QuantSpec

__all__ = ["Quantizer"]


class Quantizer(nn.Module):
    """Fake-quantizes its input with ``spec``.

    ``scale`` and ``zero_point`` are Parameters (learnable by AdaQuant); the zero-point is kept in
    float and rounded with a straight-through estimator in the forward pass. Until a range is set
    (``initialized`` False) or while ``enabled`` is False the module is the identity.
    """

    initialized: torch.Tensor

    def __init__(self, spec: QuantSpec, channels: int = 1) -> None:
        super().__init__()
        self.spec = spec
        n = channels if spec.per_channel else 1
        self.scale = nn.Parameter(torch.ones(n))
        self.zero_point = nn.Parameter(torch.zeros(n))
        self.enabled = True
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        g = "per-channel" if self.spec.per_channel else "per-tensor"
        sym = "symmetric" if self.spec.symmetric else "asymmetric"
        return f"bits={self.spec.bits}, {sym}, {g}, enabled={self.enabled}"

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.initialized) and self.spec.bits < 16

    def set_spec(self, spec: QuantSpec) -> None:
        """Change the grid (e.g. the bit width); the range must be set again afterwards."""
        if spec.per_channel != self.spec.per_channel:
            raise ValueError("set_spec cannot change the granularity of an existing quantizer")
        self.spec = spec
        self.initialized.fill_(False)

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set scale and zero-point so that [lo, hi] is represented (scalars or (C,) tensors)."""
        scale, zp = qparams_from_range(lo, hi, self.spec)
        self.set_qparams(scale, zp)

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        n = self.scale.numel()
        self.scale.copy_(torch.as_tensor(scale, dtype=torch.float32).reshape(-1).expand(n))
        self.zero_point.copy_(torch.as_tensor(zero_point, dtype=torch.float32).reshape(-1).expand(n))
        self.initialized.fill_(True)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective (scale, integer zero-point) used in the forward pass, detached."""
        scale = self.scale.detach().clamp(min=EPS)
        zp = torch.round(self.zero_point.detach()).clamp(self.spec.qmin, self.spec.qmax)
        return scale, zp

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range [lo, hi] the grid currently covers."""
        scale, zp = self.qparams()
        return (self.spec.qmin - zp) * scale, (self.spec.qmax - zp) * scale

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (int32) on this grid."""
        scale, zp = self.qparams()
        return quantize_int(x, scale, zp, self.spec).to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        zp = torch.clamp(self.zero_point, self.spec.qmin, self.spec.qmax)
        return fake_quantize(x, self.scale.clamp(min=EPS), zp, self.spec)
