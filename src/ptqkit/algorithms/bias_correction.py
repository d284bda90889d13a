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
anything is modified. Without the input quantizer the error op(x, D) is linear in x, so its sum
over a batch is op(sum_n x_n, D): one sample's cost per batch instead of N (``summed_error``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..calib.data import token_mask_of
from ..core.quantizer import Quantizer
from ..nn.control import quantizers_disabled
from ..nn.modules import QuantLinear, QuantModule
from .base import Context, Step, calibration_kl, register_step

__all__ = ["MODES", "banner_correction", "channel_rows", "channel_mean", "robust_shift_mask",
           "checked_xi", "centred_mse", "summed_error", "token_mask_of", "calibration_kl",
           "sequential_correction", "BiasCorrectionOptions", "BiasCorrection"]

log = logging.getLogger(__name__)
MODES = ("both", "banner", "empirical", "sequential")


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


def channel_rows(y: torch.Tensor, linear: bool,
                 token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Output values as (positions, C): y is (N, C, ...) for conv (channel axis 1) or (..., C)
    for Linear (channel axis last, e.g. (N, T, C) token states). token_mask: (N, T), 1 on real
    tokens (an attention mask); when a Linear's y is (N, T, C) with matching N, T only the real
    tokens are kept, so padded positions (which never reach a pooled output) do not count."""
    if linear and token_mask is not None and y.dim() == 3 and y.shape[:2] == token_mask.shape:
        return y[token_mask.bool()]  # (real tokens, C)
    y = y.movedim(-1 if linear else 1, -1)
    return y.reshape(-1, y.shape[-1])


def channel_mean(y: torch.Tensor, linear: bool,
                 token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Per-channel sum of ``y`` over every (real) position, (C,) float64, and the count."""
    rows = channel_rows(y, linear, token_mask)
    return rows.double().sum(dim=0), rows.shape[0]


def robust_shift_mask(abs_before: torch.Tensor, abs_after: torch.Tensor) -> torch.Tensor:
    """Which channels keep their bias shift: (C,) bool, True where the shift lowers the summed
    absolute output error too (not only the squared error, which it always lowers).

    A mean shift is the right fix for an error that is (close to) constant over positions. When
    the mean is driven by a few positions with huge errors (e.g. a transformer's massive
    activation on the [CLS] token, destroyed by weight clipping), the shift moves every other
    position away from its float value: the squared error still falls a little, the absolute
    error rises - and so does the damage downstream (LayerNorm sees the shift on every token).
    """
    return abs_after < abs_before


@dataclass(frozen=True)
class BiasCorrectionOptions:
    """mode: 'banner' (mean/std per channel, xi into the scale, mean residual into the bias),
    'empirical' (bias absorbs the mean output error), 'both' (xi into the scale, then the
    empirical bias), 'sequential' (empirical, measured on the quantized model's own inputs
    layer by layer; ``sequential_correction``). activations: the empirical output error
    includes the layer's input quantizer (Q_a(x) instead of x).

    Beyond the paper: robust keeps a channel's xi only where it does not raise the output error
    left after the bias shift (``checked_xi``) and its bias shift only where it also lowers the
    absolute output error (``robust_shift_mask``); two more float passes. guard undoes the
    whole correction if it raises the calibration loss (KL of the model outputs to the float
    ones): the per-layer statistics use float inputs and cannot see how errors compound.
    guard_samples: measure that loss on the first calibration batches holding this many samples
    (None: all of them); the two guard passes of the quantized model are most of the step's cost
    when the statistics are cheap."""

    mode: str = "both"
    activations: bool = False
    robust: bool = True
    guard: bool = True
    guard_samples: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown bias-correction mode {self.mode!r}; expected one of {MODES}")
        if self.guard_samples is not None and self.guard_samples < 1:
            raise ValueError(f"guard_samples must be >= 1 or null (all samples), got "
                             f"{self.guard_samples}")


@dataclass
class _Plan:
    """What will be applied to one layer: xi (C,) and the weight error D whose mean effect on
    the output the bias absorbs (W_repr - W_target)."""

    xi: torch.Tensor
    delta: torch.Tensor
    with_acts: bool


@torch.no_grad()
def _plan(layer: QuantModule, opts: BiasCorrectionOptions,
          xi: torch.Tensor | None = None) -> _Plan:
    """The plan of one layer; ``xi`` (C,) replaces Banner's xi when given (the robust check)."""
    w = layer.weight.detach()
    w_q = layer.w_quant(w)
    shape = [-1] + [1] * (w.dim() - 1)
    if opts.mode in ("empirical", "sequential"):
        return _Plan(torch.ones(layer.out_channels), w_q - w, opts.activations)
    xi_b, _ = banner_correction(w, w_q)
    xi = xi_b if xi is None else xi
    if opts.mode == "banner":
        d = (w - xi.reshape(shape) * w_q).reshape(w.shape[0], -1).mean(dim=1)
        return _Plan(xi, -d.reshape(shape).expand_as(w).clone(), False)
    return _Plan(xi, xi.reshape(shape) * w_q - w, opts.activations)


def centred_mse(acc: dict[str, Any], key: str) -> torch.Tensor:
    """Per-channel output MSE left after the best constant shift, Var = E[e^2] - E[e]^2 (C,),
    from sums ``key + '_sum'`` and ``key + '_sq'`` over ``acc['count']`` positions."""
    mean = acc[key + "_sum"] / acc["count"]
    return acc[key + "_sq"] / acc["count"] - mean * mean


@contextmanager
def _forced_on(q: Quantizer) -> Iterator[Quantizer]:
    saved = q.enabled
    q.enabled = True
    try:
        yield q
    finally:
        q.enabled = saved


def _layer_error(mod: QuantModule, x: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """The output error of one call on float input x that the bias should absorb (see _Plan)."""
    if plan.with_acts:  # op(Q_a(x), W_repr) - op(x, W) = op(Q_a(x), W + D) - op(x, W)
        with _forced_on(mod.a_quant):
            xa = mod.a_quant(x)
        w = mod.weight.detach()
        return mod.op(xa, w + plan.delta, None) - mod.op(x, w, None)
    return mod.op(x, plan.delta, None)


Collector = Callable[[QuantModule, torch.Tensor, "torch.Tensor | None"], None]


def summed_error(mod: QuantModule, x: torch.Tensor, delta: torch.Tensor, linear: bool,
                 mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Per-channel sum (C,) float64 of op(x, D) over every (real) position of a batch, and the
    number of positions, computed on the batch-summed input: sum_n op(x_n, D) = op(sum_n x_n, D)
    for an op linear in x (convolution with zero padding, linear), so the cost is that of one
    sample instead of N. The batch sum is taken in x's dtype (a float64 copy of x cost more
    than the op); the float64 accumulation is over the output positions.
    x: (N, ...) the layer's input; mask: (N, T) real tokens or None."""
    if linear and mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        keep = mask.to(x.dtype).unsqueeze(-1)
        xs, n = (x * keep).sum(dim=0, keepdim=True), int(mask.sum())
        y = mod.op(xs, delta, None)
        return y.sum(dim=tuple(range(y.dim() - 1)), dtype=torch.float64), n
    y = mod.op(x.sum(dim=0, keepdim=True), delta, None)
    rows = channel_rows(y, linear)
    return rows.sum(dim=0, dtype=torch.float64), rows.shape[0] * x.shape[0]


LINEARITY_RTOL = 1e-3  # the batch-summed error must match the per-sample one this closely


def _linear_in_x(full: torch.Tensor, summed: torch.Tensor) -> bool:
    """Whether the batch-summed channel sums ``summed`` reproduce the per-sample ones ``full``
    (both (C,)): to LINEARITY_RTOL of the largest channel sum (float32 round-off passes, an op
    that is not linear in its input, e.g. a custom forward adding a constant, does not)."""
    tol = LINEARITY_RTOL * float(full.abs().max()) + 1e-12
    return bool((full - summed).abs().max() <= tol)


def _error_collector(layer: QuantModule, plan: _Plan, acc: dict[str, Any]) -> Collector:
    """Per-channel statistics of the plan's output error over the real positions of a batch:
    first the sum (pass 1), then, once acc['mean'] is known, the absolute error without and
    with the shift (the robust check).

    Without the input quantizer in the error (plan.with_acts False) the error op(x, D) is
    linear in x, and the sum of pass 1 is taken on the batch-summed input (``summed_error``),
    after the first batch has checked that it reproduces the per-sample sum for this layer."""
    linear = isinstance(layer, QuantLinear)

    def collect(mod: QuantModule, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if "mean" not in acc and acc.get("summed", False):
            total, n = summed_error(mod, x, plan.delta, linear, mask)
            acc["sum"], acc["count"] = acc["sum"] + total, acc["count"] + n
            return
        rows = channel_rows(_layer_error(mod, x, plan), linear, mask).double()
        if "mean" not in acc:
            acc["sum"] = acc.get("sum", 0) + rows.sum(dim=0)
            acc["count"] = acc.get("count", 0) + rows.shape[0]
            if "summed" not in acc:  # the first batch decides, for every later batch
                acc["summed"] = (not plan.with_acts and _linear_in_x(
                    rows.sum(dim=0), summed_error(mod, x, plan.delta, linear, mask)[0]))
        else:
            acc["abs_before"] = acc.get("abs_before", 0) + rows.abs().sum(dim=0)
            acc["abs_after"] = acc.get("abs_after", 0) + (rows - acc["mean"]).abs().sum(dim=0)
    return collect


def _xi_collector(layer: QuantModule, xi: torch.Tensor, acc: dict[str, Any]) -> Collector:
    """Sums and squared sums of the output error with Banner's xi (xi W~ - W) and without it
    (W~ - W), per channel, for ``centred_mse``."""
    linear = isinstance(layer, QuantLinear)
    w = layer.weight.detach()
    w_q = layer.w_quant(w)
    deltas = {"xi": xi.reshape([-1] + [1] * (w.dim() - 1)) * w_q - w, "one": w_q - w}

    def collect(mod: QuantModule, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        for key, delta in deltas.items():
            rows = channel_rows(mod.op(x, delta, None), linear, mask).double()
            acc[key + "_sum"] = acc.get(key + "_sum", 0) + rows.sum(dim=0)
            acc[key + "_sq"] = acc.get(key + "_sq", 0) + rows.pow(2).sum(dim=0)
        acc["count"] = acc.get("count", 0) + rows.shape[0]
    return collect


@torch.no_grad()
def _stats_pass(ctx: Context, collectors: dict[str, Collector], desc: str) -> None:
    """One pass of the float model over the calibration set; each named layer's collector sees
    its float input and the batch's token mask (None for non-token batches). When the float
    reference logits are not cached yet and the weights are still the float snapshot, the pass
    caches them too (``Context.wants_float_outputs``)."""
    layers = ctx.layers()
    state: dict[str, Any] = {}
    record = ctx.wants_float_outputs()
    outputs: list[torch.Tensor] = []

    def hook(name: str):  # type: ignore[no-untyped-def]
        return lambda mod, args: collectors[name](mod, args[0].detach(), state.get("mask"))

    handles = [layers[n].register_forward_pre_hook(hook(n)) for n in collectors]
    try:
        with quantizers_disabled(ctx.qmodel):
            for batch in tqdm(ctx.calib.batches, desc=desc, leave=False, disable=None):
                state["mask"] = token_mask_of(batch)
                out = ctx.calib.forward(ctx.qmodel, batch)
                if record:
                    outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    if record:
        ctx.keep_float_outputs(outputs)


@torch.no_grad()
def checked_xi(ctx: Context, plans: dict[str, _Plan]) -> dict[str, torch.Tensor]:
    """Robust check of Banner's xi: per channel, keep xi only where the output error left after
    the bias shift (``centred_mse``) is not larger with it than without it, else 1. Rescaling is
    meant to restore the spread lost to rounding; after clipping an outlier weight (which then
    dominates std(W)) it blows the whole channel up instead."""
    layers = ctx.layers()
    accs: dict[str, dict[str, Any]] = {n: {} for n in plans}
    _stats_pass(ctx, {n: _xi_collector(layers[n], p.xi, accs[n]) for n, p in plans.items()},
                "bias correction (xi check)")
    return {n: torch.where(centred_mse(a, "xi") <= centred_mse(a, "one"), plans[n].xi,
                           torch.ones_like(plans[n].xi)) for n, a in accs.items() if a}


@torch.no_grad()
def mean_output_errors(ctx: Context, plans: dict[str, _Plan],
                       robust: bool = False) -> dict[str, torch.Tensor]:
    """E[error]_c per layer (C,) over the calibration set, error as described by each plan.
    robust: a second pass zeroes the channels whose shift would raise the absolute error."""
    layers = ctx.layers()
    accs: dict[str, dict[str, Any]] = {n: {} for n in plans}
    collectors = {n: _error_collector(layers[n], p, accs[n]) for n, p in plans.items()}
    _stats_pass(ctx, collectors, "bias correction")
    for a in accs.values():
        if a:
            a["mean"] = a["sum"] / a["count"]
    if robust:
        _stats_pass(ctx, collectors, "bias correction (shift check)")
        for a in accs.values():
            if "abs_before" in a:
                a["mean"] = torch.where(robust_shift_mask(a["abs_before"], a["abs_after"]),
                                        a["mean"], torch.zeros_like(a["mean"]))
    return {n: a["mean"].float() for n, a in accs.items() if "mean" in a}


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
    shift, shifted = 0.0, 0
    if mean_err is not None:
        bias = layer.ensure_bias()
        bias.sub_(mean_err.to(bias.dtype))
        shift = float(mean_err.abs().max())
        shifted = int((mean_err != 0).sum())
    return {"xi_min": float(plan.xi.min()), "xi_max": float(plan.xi.max()),
            "xi_channels": int((plan.xi != 1).sum()), "bias_shift_max": shift,
            "shifted_channels": shifted}


class _StopForward(Exception):
    """Raised by a hook once the layer of interest has run: the rest of the model is skipped."""


@torch.no_grad()
def _output_means(ctx: Context, names: list[str], quantized: bool,
                  stop: bool = False) -> dict[str, torch.Tensor]:
    """Per-channel mean (C,) of each named layer's output over the real positions of the
    calibration set, in the float model (quantizers off) or the quantized one. ``stop``: skip
    the rest of the model after the last named layer (one layer at a time)."""
    layers = ctx.layers()
    accs: dict[str, list[Any]] = {n: [0, 0] for n in names}
    state: dict[str, Any] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(mod: QuantModule, args: Any, out: torch.Tensor) -> None:
            s, n = channel_mean(out.detach(), isinstance(mod, QuantLinear), state.get("mask"))
            accs[name][0], accs[name][1] = accs[name][0] + s, accs[name][1] + n
            if stop and name == names[-1]:
                raise _StopForward
        return fn

    handles = [layers[n].register_forward_hook(hook(n)) for n in names]
    try:
        with quantizers_disabled(ctx.qmodel) if not quantized else nullcontext():
            for batch in ctx.calib.batches:
                state["mask"] = token_mask_of(batch)
                try:
                    ctx.calib.forward(ctx.qmodel, batch)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {n: (a[0] / max(a[1], 1)).float() for n, a in accs.items() if a[1]}


@torch.no_grad()
def sequential_correction(ctx: Context, names: list[str]) -> dict[str, dict[str, float]]:
    """Empirical bias correction on the quantized model's own inputs, layer by layer in
    execution order (beyond the paper): b_l -= E[y_l(quantized prefix)] - E[y_l(float)], each
    layer seeing the already corrected layers before it, so errors that compound through the
    network (and the input quantizers' own bias) are corrected too. One float pass, then one
    pass per layer that stops after that layer."""
    float_means = _output_means(ctx, names, quantized=False)
    layers = ctx.layers()
    infos: dict[str, dict[str, float]] = {}
    for name in tqdm(names, desc="bias correction (sequential)", leave=False, disable=None):
        if name not in float_means:
            continue
        q_mean = _output_means(ctx, [name], quantized=True, stop=True)[name]
        err = q_mean - float_means[name]
        bias = layers[name].ensure_bias()
        bias.sub_(err.to(bias.dtype))
        infos[name] = {"xi_min": 1.0, "xi_max": 1.0, "xi_channels": 0,
                       "bias_shift_max": float(err.abs().max()),
                       "shifted_channels": int((err != 0).sum())}
    return infos


def _undo_handle(layers: dict[str, QuantModule]) -> Callable[[], None]:
    """Saves what the step changes (weight, weight scale, bias); calling the handle restores
    them bit-exactly (a bias the step created is removed again)."""
    saved = {n: (m.weight.detach().clone(), m.w_quant.scale.detach().clone(),
                 None if m.bias is None else m.bias.detach().clone()) for n, m in layers.items()}

    @torch.no_grad()
    def undo() -> None:
        for n, (w, scale, bias) in saved.items():
            m = layers[n]
            m.weight.copy_(w)
            m.w_quant.scale.copy_(scale)
            if bias is None:
                m.bias = None
            else:
                m.bias.copy_(bias)  # type: ignore[union-attr]
    return undo


@register_step
class BiasCorrection(Step[BiasCorrectionOptions]):
    """Banner's per-channel weight bias correction and/or empirical bias correction."""

    name = "bias_correction"
    Options = BiasCorrectionOptions
    effects = frozenset({"tunes_ranges", "changes_weights"})

    def run(self, ctx: Context) -> dict[str, Any]:
        def guard_kl() -> float | None:
            return calibration_kl(ctx, self.options.guard_samples) if self.options.guard else None

        layers = {n: m for n, m in ctx.layers().items() if m.w_quant.active}
        plans = {n: _plan(layer, self.options) for n, layer in layers.items()}
        if self.options.robust and self.options.mode in ("both", "banner"):
            xis = checked_xi(ctx, plans)
            plans = {n: _plan(layers[n], self.options, xis.get(n)) for n in plans}
        undo = _undo_handle({n: layers[n] for n in plans})
        if self.options.mode == "sequential":
            ctx.float_outputs()  # the reference, cached before any bias moves
            before = guard_kl()
            infos = sequential_correction(ctx, list(plans))
        else:  # the statistics pass changes nothing and caches the float reference if needed
            errors = mean_output_errors(ctx, plans, self.options.robust)
            before = guard_kl()
            infos = {n: _apply(layers[n], plan, errors.get(n)) for n, plan in plans.items()}
        after = guard_kl()
        kept = before is None or after is None or after <= before
        if not kept:
            log.info("bias correction raised the calibration KL %.5f -> %.5f; undone", before, after)
            undo()
        for name, info in infos.items():
            ctx.report.layer(name).update(bias_correction={**info, "kept": kept})
        return {"mode": self.options.mode, "activations": self.options.activations,
                "layers": len(plans), "kl_before": before, "kl_after": after, "kept": kept}
