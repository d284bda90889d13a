"""Bias correction of quantized weights (Banner et al., section 5) and its empirical variant.

Banner: quantization shifts the mean and spread of each output channel's weights. Correct
channel c as W^_c = xi_c (W~_c - mean(W~_c)) + mean(W_c), xi_c = std(W_c) / std(W~_c).

Kept exportable: xi_c is folded into the channel's scale (and the float weight is scaled by xi_c
with it, so the integer codes do not change), giving the represented weights xi_c W~_c. What is
left, W^ - xi W~ = d_c (a per-channel constant), cannot live on the grid; it moves into the bias
through the calibration-set mean of the layer input: b_c <- b_c + E[(d_c 1) * x]_c.

Empirical variant: b_c <- b_c - E[(W_repr - W) x]_c, the calibration-set mean of the layer's
output error (optionally including its input quantizer: E[op(Q_a(x), W_repr) - op(x, W)]).

Statistics are gathered in one pass of the float model (inputs of every layer are float), before
anything is modified.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..core.quantizer import Quantizer
from ..nn.control import quantizers_disabled
from ..nn.modules import QuantLinear, QuantModule
from .base import Context, Step, register_step

__all__ = ["MODES", "banner_correction", "channel_mean", "BiasCorrectionOptions", "BiasCorrection"]

log = logging.getLogger(__name__)
MODES = ("both", "banner", "empirical")


def banner_correction(w: torch.Tensor, w_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (xi, d) such that xi * w_q + d has the mean and std of w, channel by channel.

    w, w_q: (C, ...) float and dequantized weights. xi_c = std(w_c) / std(w_q_c) (1 where w_q_c is
    constant), d_c = mean(w_c) - xi_c mean(w_q_c). Returns two (C,) tensors.
    """
    w, w_q = w.reshape(w.shape[0], -1).double(), w_q.reshape(w_q.shape[0], -1).double()
    std, std_q = w.std(dim=1, unbiased=False), w_q.std(dim=1, unbiased=False)
    xi = torch.where(std_q > 1e-12 * std.clamp(min=1e-30), std / std_q.clamp(min=1e-30),
                     torch.ones_like(std))
    d = w.mean(dim=1) - xi * w_q.mean(dim=1)
    return xi.float(), d.float()


def channel_mean(y: torch.Tensor, linear: bool) -> tuple[torch.Tensor, int]:
    """Sum over everything but the channel axis (last for Linear, 1 for conv) and the count."""
    y = y.movedim(-1 if linear else 1, 0)
    y = y.reshape(y.shape[0], -1)
    return y.double().sum(dim=1), y.shape[1]


@dataclass(frozen=True)
class BiasCorrectionOptions:
    """mode: 'banner' (mean/std per channel, xi into the scale, mean residual into the bias),
    'empirical' (bias absorbs the mean output error), 'both' (xi into the scale, then the
    empirical bias). activations: the empirical output error includes the layer's input
    quantizer (Q_a(x) instead of x)."""

    mode: str = "both"
    activations: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown bias-correction mode {self.mode!r}; expected one of {MODES}")


@dataclass
class _Plan:
    """What will be applied to one layer: xi (C,) and the weight error D whose mean effect on
    the output the bias absorbs (W_repr - W_target)."""

    xi: torch.Tensor
    delta: torch.Tensor
    with_acts: bool


@torch.no_grad()
def _plan(layer: QuantModule, opts: BiasCorrectionOptions) -> _Plan:
    w = layer.weight.detach()
    w_q = layer.w_quant(w)
    shape = [-1] + [1] * (w.dim() - 1)
    if opts.mode == "empirical":
        return _Plan(torch.ones(layer.out_channels), w_q - w, opts.activations)
    xi, d = banner_correction(w, w_q)
    if opts.mode == "banner":
        return _Plan(xi, -d.reshape(shape).expand_as(w).clone(), False)
    return _Plan(xi, xi.reshape(shape) * w_q - w, opts.activations)


@contextmanager
def _forced_on(q: Quantizer) -> Iterator[Quantizer]:
    saved = q.enabled
    q.enabled = True
    try:
        yield q
    finally:
        q.enabled = saved


def _error_hook(layer: QuantModule, plan: _Plan, acc: dict[str, Any]):  # type: ignore[no-untyped-def]
    """Forward pre-hook accumulating the per-channel sum of the output error on float inputs."""
    linear = isinstance(layer, QuantLinear)

    def hook(mod: QuantModule, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach()
        if plan.with_acts:  # op(Q_a(x), W_repr) - op(x, W) = op(Q_a(x), W + D) - op(x, W)
            with _forced_on(mod.a_quant):
                xa = mod.a_quant(x)
            w = mod.weight.detach()
            err = mod.op(xa, w + plan.delta, None) - mod.op(x, w, None)
        else:
            err = mod.op(x, plan.delta, None)
        s, n = channel_mean(err, linear)
        acc["sum"] = acc.get("sum", 0) + s
        acc["count"] = acc.get("count", 0) + n
    return hook


@torch.no_grad()
def mean_output_errors(ctx: Context, plans: dict[str, _Plan]) -> dict[str, torch.Tensor]:
    """One float pass: E[error]_c per layer (C,), error as described by each plan."""
    layers = ctx.layers()
    accs: dict[str, dict[str, Any]] = {n: {} for n in plans}
    handles = [layers[n].register_forward_pre_hook(_error_hook(layers[n], p, accs[n]))
               for n, p in plans.items()]
    try:
        with quantizers_disabled(ctx.qmodel):
            ctx.calib.run_all(ctx.qmodel)
    finally:
        for h in handles:
            h.remove()
    return {n: (a["sum"] / a["count"]).float() for n, a in accs.items() if a}


@torch.no_grad()
def _apply(layer: QuantModule, plan: _Plan, mean_err: torch.Tensor | None) -> dict[str, float]:
    """Fold xi into weight and scale together (integer codes unchanged); bias -= mean error."""
    shape = [-1] + [1] * (layer.weight.dim() - 1)
    codes = layer.w_quant.int_repr(layer.weight)
    layer.weight.mul_(plan.xi.reshape(shape))
    layer.w_quant.scale.mul_(plan.xi)
    changed = int((layer.w_quant.int_repr(layer.weight) != codes).sum())
    if changed:  # float round-off at exact .5 ties; harmless but worth knowing
        log.debug("%d integer weights moved by folding xi", changed)
    shift = 0.0
    if mean_err is not None:
        bias = layer.ensure_bias()
        bias.sub_(mean_err.to(bias.dtype))
        shift = float(mean_err.abs().max())
    return {"xi_min": float(plan.xi.min()), "xi_max": float(plan.xi.max()),
            "bias_shift_max": shift}


@register_step
class BiasCorrection(Step):
    """Banner's per-channel weight bias correction and/or empirical bias correction."""

    name = "bias_correction"
    Options = BiasCorrectionOptions

    def run(self, ctx: Context) -> dict[str, Any]:
        ctx.float_outputs()  # cache the float reference before weights are rescaled
        plans = {n: _plan(layer, self.options) for n, layer in ctx.layers().items()
                 if layer.w_quant.active}
        errors = mean_output_errors(ctx, plans)
        layers = ctx.layers()
        for name, plan in plans.items():
            info = _apply(layers[name], plan, errors.get(name))
            ctx.report.layer(name).update(bias_correction=info)
        return {"mode": self.options.mode, "activations": self.options.activations,
                "layers": len(plans)}
