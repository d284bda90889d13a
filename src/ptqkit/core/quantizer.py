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

    ``channel_bits`` (optional, per-channel quantizers): fewer levels on some channels - channel c
    uses only the codes of a ``channel_bits[c]``-bit grid inside this quantizer's ``spec.bits``
    grid (Banner's per-channel bit allocation). Exported as ordinary per-channel scales and
    zero-points on the ``spec.bits`` grid; the integer weights simply never leave the channel's
    code range.
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
        self.channel_bits: torch.Tensor | None
        self.register_buffer("channel_bits", None)

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
        self.channel_bits = None
        self.initialized.fill_(False)

    def set_channel_bits(self, bits: torch.Tensor | None) -> None:
        """Per-channel bit widths (C,) within ``spec.bits``, or None for the uniform grid."""
        if bits is None:
            self.channel_bits = None
            return
        bits = torch.as_tensor(bits).reshape(-1).long()
        if not self.spec.per_channel or bits.numel() != self.scale.numel():
            raise ValueError(f"channel bits need a per-channel quantizer with {self.scale.numel()} "
                             f"channels, got {bits.numel()} values")
        if int(bits.min()) < 2 or int(bits.max()) > self.spec.bits:
            raise ValueError(f"channel bits must lie in 2..{self.spec.bits} (the grid's bits), got "
                             f"{int(bits.min())}..{int(bits.max())}; raise spec.bits first")
        self.channel_bits = bits.clone()

    def code_bounds(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel (qmin, qmax) codes when ``channel_bits`` is set, else None (the spec's)."""
        if self.channel_bits is None:
            return None
        levels = torch.pow(2.0, self.channel_bits.float())
        lo = -levels / 2 if self.spec.symmetric else torch.zeros_like(levels)
        return lo, lo + levels - 1

    @property
    def storage_bits(self) -> float:
        """Mean bits per weight: spec.bits, or the mean of ``channel_bits``."""
        if self.channel_bits is None:
            return float(self.spec.bits)
        return float(self.channel_bits.float().mean())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # channel_bits is optional: adopt whatever the checkpoint holds (absent -> uniform grid)
        key = prefix + "channel_bits"
        self.channel_bits = state_dict[key].clone() if key in state_dict else None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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
        lo, hi = self.code_bounds() or (self.spec.qmin, self.spec.qmax)
        zp = torch.clamp(torch.round(self.zero_point.detach()), lo, hi)  # type: ignore[arg-type]
        return scale, zp

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range [lo, hi] the grid currently covers."""
        scale, zp = self.qparams()
        lo, hi = self.code_bounds() or (self.spec.qmin, self.spec.qmax)
        return (lo - zp) * scale, (hi - zp) * scale

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` (int32) on this grid."""
        scale, zp = self.qparams()
        return quantize_int(x, scale, zp, self.spec, self.code_bounds()).to(torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        bounds = self.code_bounds()
        lo, hi = bounds or (self.spec.qmin, self.spec.qmax)
        zp = torch.clamp(self.zero_point, lo, hi)  # type: ignore[arg-type]
        return fake_quantize(x, self.scale.clamp(min=EPS), zp, self.spec, bounds)
