"""Range initialisation step: weights per channel, activations per tensor from one data pass.

Also the start-point choice of later steps (``choose_start_ranges``): the recipe's ranges or another
range set, whichever has the lower calibration loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..calib.capture import collect_input_samples
from ..nn.control import quantizers_disabled
from ..ranges import RANGE_METHODS, get_range_method
from .base import Context, Step, register_step

__all__ = ["RangeOptions", "RangeInit", "init_weight_ranges", "init_activation_ranges",
           "float_input_samples", "START_CANDIDATES", "choose_start_ranges"]

# Range sets tried besides the recipe's own when a step chooses its start by calibration loss:
# name -> (weight method, activation method). "aciq" as in Banner et al. (and ptqkit's "aciq" bench
# method): it clips activations, weights stay min-max.
START_CANDIDATES: dict[str, tuple[str, str]] = {"mse": ("mse", "mse"), "aciq": ("minmax", "aciq")}


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
def float_input_samples(ctx: Context, max_samples: int,
                        keep_outputs: bool = False) -> dict[str, torch.Tensor]:
    """Samples of every layer's input in a single pass over the calibration data, with all
    quantizers off (float inputs): they do not depend on the quantizers' current ranges.
    ``keep_outputs``: while the weights are the float snapshot, the pass also caches the float
    reference outputs that later steps compare against (``Context.wants_float_outputs``)."""
    outputs: list[torch.Tensor] | None = [] if keep_outputs and ctx.wants_float_outputs() else None
    with quantizers_disabled(ctx.qmodel):
        samples = collect_input_samples(ctx.qmodel, ctx.layers(), ctx.calib, max_samples,
                                        ctx.seed, outputs)
    if outputs is not None:
        ctx.keep_float_outputs(outputs)
    return samples


@torch.no_grad()
def init_activation_ranges(ctx: Context, opts: RangeOptions,
                           samples: dict[str, torch.Tensor] | None = None,
                           keep_outputs: bool = False) -> None:
    """One range per layer input from ``samples`` (default: ``float_input_samples``, which
    ``keep_outputs`` is passed to; pass samples to set several range methods from one pass)."""
    fn = get_range_method(opts.activations)
    if samples is None:
        samples = float_input_samples(ctx, opts.max_samples, keep_outputs)
    for name, layer in ctx.layers().items():
        if name in samples:
            x = samples[name].reshape(1, -1)
            lo, hi = fn(x, layer.a_quant.spec, **_options_for(opts.activations, opts))
            layer.a_quant.set_range(lo, hi)
            ctx.report.layer(name)["a_range"] = opts.activations


QParams = dict[str, dict[str, torch.Tensor]]


def _qparams(ctx: Context) -> QParams:
    """Every quantizer's state (scale, zero-point, initialised flag), cloned."""
    out: QParams = {}
    for name, layer in ctx.layers().items():
        for kind in ("w_quant", "a_quant"):
            state = getattr(layer, kind).state_dict()
            out[f"{name}.{kind}"] = {k: v.detach().clone() for k, v in state.items()}
    return out


def _load_qparams(ctx: Context, params: QParams) -> None:
    for name, layer in ctx.layers().items():
        for kind in ("w_quant", "a_quant"):
            getattr(layer, kind).load_state_dict(params[f"{name}.{kind}"])


def _same(a: QParams, b: QParams) -> bool:
    return all(torch.equal(a[q][k], b[q][k]) for q in a for k in a[q])


@torch.no_grad()
def choose_start_ranges(ctx: Context, loss: Callable[[], float],
                        candidates: dict[str, tuple[str, str]] | None = None) -> dict[str, Any]:
    """Keep the quantizer ranges the model has now ("given": the recipe's, or an earlier step's)
    or replace them by the ranges the "ranges" step sets with one of ``candidates`` (default
    ``START_CANDIDATES``), whichever gives the lowest ``loss()`` (ties keep the given ones; a
    candidate identical to them is not evaluated again). The choice is left applied, and the
    report's w_range / a_range name it. Returns {"start": name, "start_losses": {name: loss}}."""
    names = list(ctx.layers())

    def labels() -> dict[str, dict[str, Any]]:
        return {n: {k: ctx.report.layer(n).get(k) for k in ("w_range", "a_range")} for n in names}

    def score() -> float:
        value = float(loss())
        return value if math.isfinite(value) else math.inf

    given = _qparams(ctx)
    losses, params, reported = {"given": score()}, {"given": given}, {"given": labels()}
    samples = float_input_samples(ctx, RangeOptions().max_samples)  # one pass for all candidates
    for key, (w_method, a_method) in (START_CANDIDATES if candidates is None else candidates).items():
        opts = RangeOptions(weights=w_method, activations=a_method)
        init_weight_ranges(ctx, opts)
        init_activation_ranges(ctx, opts, samples)
        cand = _qparams(ctx)
        if not _same(cand, given):
            params[key], losses[key], reported[key] = cand, score(), labels()
    best = min(losses, key=lambda k: losses[k])
    _load_qparams(ctx, params[best])
    for n, info in reported[best].items():
        for key, value in info.items():
            if value is None:
                ctx.report.layer(n).pop(key, None)
            else:
                ctx.report.layer(n)[key] = value
    return {"start": best, "start_losses": losses}


@register_step
class RangeInit(Step[RangeOptions]):
    name = "ranges"
    Options = RangeOptions
    effects = frozenset({"initialises_ranges"})

    def run(self, ctx: Context) -> dict[str, Any]:
        init_weight_ranges(ctx, self.options)
        # later steps compare against the float outputs: the statistics pass keeps them
        later_steps = ctx.recipe is not None and bool(ctx.recipe.steps)
        init_activation_ranges(ctx, self.options, keep_outputs=later_steps)
        return {"weights": self.options.weights, "activations": self.options.activations,
                "available": sorted(RANGE_METHODS)}
