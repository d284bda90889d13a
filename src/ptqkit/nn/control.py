"""Scoped switches over a quantized model (every mutation is undone on exit)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..core.quantizer import Quantizer

__all__ = ["quantizers_disabled", "only_enabled", "FloatWeights", "float_weights",
           "original_float"]

FloatWeights = dict[str, tuple[torch.Tensor, "torch.Tensor | None"]]


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


def float_weights(model: nn.Module) -> FloatWeights:
    """Copies of every quantized layer's (weight, bias) - the float function the steps start
    from; take it before steps that adapt the float weights (AdaQuant, BN tuning, ...)."""
    from .modules import quant_layers

    return {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
            for n, m in quant_layers(model).items()}


@contextmanager
def original_float(model: nn.Module, saved: FloatWeights | None) -> Iterator[nn.Module]:
    """Quantizers off and, when ``saved`` is given, the saved float weights swapped in (a bias
    added after the snapshot counts as zero); everything is restored bit-exactly on exit."""
    from .modules import quant_layers

    layers = quant_layers(model)
    current = float_weights(model) if saved else {}
    try:
        with torch.no_grad():
            for name, (w, b) in (saved or {}).items():
                layers[name].weight.copy_(w)
                bias = layers[name].bias
                if bias is not None:
                    bias.copy_(b if b is not None else torch.zeros_like(bias))
        with quantizers_disabled(model):
            yield model
    finally:
        with torch.no_grad():
            for name, (w, b) in current.items():
                layers[name].weight.copy_(w)
                bias = layers[name].bias
                if b is not None and bias is not None:
                    bias.copy_(b)
