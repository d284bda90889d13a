"""ptqkit: post-training quantization of PyTorch models."""

from __future__ import annotations

from .core.spec import QuantSpec
from .export.onnx import export_onnx
from .export.packed import load, save
from .pipeline import Recipe, quantize

__all__ = ["quantize", "Recipe", "QuantSpec", "export_onnx", "save", "load"]
__version__ = "0.1.0"
