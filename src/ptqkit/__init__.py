"""ptqkit: post-training quantization of PyTorch models."""

from __future__ import annotations

from .core.spec import QuantSpec
from .pipeline import Recipe, quantize

__all__ = ["quantize", "Recipe", "QuantSpec"]
__version__ = "0.1.0"
