"""What a quantized number is: bit width, symmetry and granularity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["QuantSpec", "SUPPORTED_BITS"]

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8, 16)


@dataclass(frozen=True)
class QuantSpec:
    """A uniform integer grid.

    bits: 2..8 or 16. symmetric: zero-point fixed at the grid centre (signed grid
    [-2^(b-1), 2^(b-1)-1], zero-point 0); asymmetric: unsigned grid [0, 2^b - 1] with an integer
    zero-point ("GEMMLOWP"). granularity: one scale per tensor, or one per slice along ``axis``.
    """

    bits: int = 8
    symmetric: bool = False
    granularity: Literal["tensor", "channel"] = "tensor"
    axis: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"QuantSpec.bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel"):
            raise ValueError(
                f"QuantSpec.granularity must be 'tensor' or 'channel', got {self.granularity!r}"
            )

    @property
    def per_channel(self) -> bool:
        return self.granularity == "channel"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return 2**self.bits

    def with_bits(self, bits: int) -> QuantSpec:
        return QuantSpec(bits, self.symmetric, self.granularity, self.axis)
