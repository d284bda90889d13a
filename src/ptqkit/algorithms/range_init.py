"""Range initialisation step: weights per channel, activations per tensor from one data pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..calib.capture import collect_input_samples
from ..nn.control import quantizers_disabled
from ..ranges import RANGE_METHODS, get_range_method
from .base import Context, Step, register_step

__all__ = ["RangeOptions", "RangeInit", "init_weight_ranges", "init_activation_ranges"]


@dataclass(frozen=True)
class RangeOptions:
    """weights / activations: names in ranges.RANGE_METHODS; percentile for 'percentile'."""

    weights: str = "mse"
    activations: str = "mse"
    percentile: float = 99.99
    max_samples: int = 1 << 18

    def __post_init__(self) -> None:
        for m in (self.weights, self.activations):
            get_range_method(m)
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")


def _options_for(method: str, opts: RangeOptions) -> dict[str, Any]:
    return {"percentile": opts.percentile} if method == "percentile" else {}


@torch.no_grad()
def init_weight_ranges(ctx: Context, opts: RangeOptions) -> None:
    fn = get_range_method(opts.weights)
    for name, layer in ctx.layers().items():
        w = layer.weight.detach().reshape(layer.out_channels, -1)
        layer.w_quant.set_range(*fn(w, layer.w_quant.spec, **_options_for(opts.weights, opts)))
        ctx.report.layer(name)["w_range"] = opts.weights


@torch.no_grad()
def init_activation_ranges(ctx: Context, opts: RangeOptions) -> None:
    """Statistics of every layer input in a single pass over the calibration data, with all
    quantizers off (float inputs), then one range per layer input."""
    fn = get_range_method(opts.activations)
    layers = ctx.layers()
    with quantizers_disabled(ctx.qmodel):
        samples = collect_input_samples(ctx.qmodel, layers, ctx.calib, opts.max_samples, ctx.seed)
    for name, layer in layers.items():
        if name in samples:
            x = samples[name].reshape(1, -1)
            lo, hi = fn(x, layer.a_quant.spec, **_options_for(opts.activations, opts))
            layer.a_quant.set_range(lo, hi)
            ctx.report.layer(name)["a_range"] = opts.activations


@register_step
class RangeInit(Step):
    name = "ranges"
    Options = RangeOptions

    def run(self, ctx: Context) -> dict[str, Any]:
        init_weight_ranges(ctx, self.options)
        init_activation_ranges(ctx, self.options)
        return {"weights": self.options.weights, "activations": self.options.activations,
                "available": sorted(RANGE_METHODS)}
