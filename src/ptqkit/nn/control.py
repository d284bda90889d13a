"""Scoped switches over a quantized model (every mutation is undone on exit)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from ..core.quantizer import Quantizer

__all__ = ["quantizers_disabled", "only_enabled"]


@contextmanager
def quantizers_disabled(model: nn.Module, which: str = "all") -> Iterator[nn.Module]:
    """Temporarily disable quantizers: which = 'all', 'weights' or 'activations'.

    Inside the block the model computes the (BN-folded) float function.
    """
    saved = []
    for name, mod in model.named_modules():
        if isinstance(mod, Quantizer):
            kind = "weights" if name.endswith("w_quant") else "activations"
            if which in ("all", kind):
                saved.append((mod, mod.enabled))
                mod.enabled = False
    try:
        yield model
    finally:
        for mod, flag in saved:
            mod.enabled = flag


@contextmanager
def only_enabled(model: nn.Module, layers: Iterable[str]) -> Iterator[nn.Module]:
    """Temporarily quantize only the named layers; every other quantizer is disabled."""
    keep = tuple(f"{n}." for n in layers)
    saved = []
    for name, mod in model.named_modules():
        if isinstance(mod, Quantizer) and not name.startswith(keep):
            saved.append((mod, mod.enabled))
            mod.enabled = False
    try:
        yield model
    finally:
        for mod, flag in saved:
            mod.enabled = flag
