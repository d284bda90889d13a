"""LAPQ: loss-aware post-training quantization (Nahshan et al., "Loss Aware Post-training
Quantization").

Step 1 (Lp initialisation): for every p of a grid (about 2..4) set each clipping range to the
Lp-optimal one, argmin ||X - Q(X)||_p^p (weights per channel, activations per tensor), measure the
calibration loss, fit a parabola loss(p) = a p^2 + b p + c and take its vertex p* = -b / (2a).
The Lp initialisation is the best of the grid points and p*.

Initial point (beyond the paper, ``init='best'``, the default): Powell starts from whichever of
the candidate range sets - Lp at p*, MSE (eq. 1 of Hubara et al.) and ACIQ (Banner: ACIQ
activations, min-max per-channel weights) - has the lowest loss on the whole calibration set;
``init='lp'`` is the paper's choice. Where the Lp ranges fit poorly (MobileNetV2 at 4 bits: Lp
87.58 vs MSE 89.74 top-1) Powell's small budget cannot make up for a poor starting point.

Step 2 (joint optimisation): one clipping multiplier m_q per quantizer, range_q = m_q * init_q,
optimised jointly with Powell's method (scipy) on the calibration loss - label-free KL to the
float logits, or cross-entropy relative to the float model's when the calibration batches carry
labels (:func:`~ptqkit.calib.loss.calibration_loss`). At 4 bits and below the
loss is not separable across layers, hence the joint search. The number of loss evaluations is
capped; the result is never worse than the initial point on the full calibration loss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from torch import nn
from tqdm.auto import tqdm

from ..calib.capture import collect_input_samples
from ..calib.data import CalibrationData, batch_size_of
from ..calib.loss import calibration_loss
from ..core.quantizer import Quantizer
from ..nn.control import quantizers_disabled
from ..nn.modules import QuantModule
from ..ranges.lp import lp_search_refined
from .base import Context, Step, all_zero, register_step
from .range_init import START_CANDIDATES, RangeOptions, init_activation_ranges, init_weight_ranges

__all__ = ["parabola_vertex", "LAPQOptions", "LAPQ", "LOSSES", "INITS",
           "INIT_CANDIDATES"]

log = logging.getLogger(__name__)
LOSSES = ("auto", "kl", "ce")
INITS = ("best", "lp")
# Tried besides Lp at p* when init='best': (weight method, activation method), the same range sets
# AdaQuant's start='best' compares.
INIT_CANDIDATES: dict[str, tuple[str, str]] = START_CANDIDATES
Range = tuple[torch.Tensor, torch.Tensor]


def parabola_vertex(ps: list[float], losses: list[float]) -> float | None:
    """Vertex p* = -b / (2a) of the least-squares parabola through (p, loss) points, or None when
    the fit opens downwards or the vertex lies outside [min(ps), max(ps)] (no interior minimum)."""
    if len(ps) < 3 or not all(math.isfinite(v) for v in losses):
        return None
    a, b, _ = np.polyfit(np.asarray(ps, float), np.asarray(losses, float), 2)
    if a <= 0:
        return None
    vertex = float(-b / (2 * a))
    return vertex if min(ps) <= vertex <= max(ps) else None


@dataclass(frozen=True)
class LAPQOptions:
    """p_grid: p values of the Lp initialisation. max_evals: budget of loss evaluations for
    Powell; powell_iters: its iterations (1-2 suffice); xtol: line-search tolerance on the
    multipliers; bounds: allowed multiplier range. loss: 'auto' (CE if labels, else KL), 'kl',
    'ce'. powell_samples: calibration samples for the p grid and Powell (None: all); the init
    and the final never-worse check use all, and the result must not be worse on the samples
    Powell did not see either. include_8bit: also optimise quantizers at >= 8
    bits. coarse / fine: Lp search resolution; max_samples: activation samples per layer.
    cache_outputs: reuse unchanged layer prefixes between evaluations (faster, more memory).
    init: 'best' (Powell starts from the lowest-loss of Lp at p*, MSE and ACIQ ranges; beyond
    the paper) or 'lp' (the paper: Lp at p*)."""

    p_grid: tuple[float, ...] = (2.0, 2.5, 3.0, 3.5, 4.0)
    max_evals: int = 200
    powell_iters: int = 2
    xtol: float = 0.05
    bounds: tuple[float, float] = (0.3, 1.7)
    loss: str = "auto"
    powell_samples: int | None = 256
    include_8bit: bool = False
    coarse: int = 20
    fine: int = 20
    max_samples: int = 1 << 15
    cache_outputs: bool = True
    init: str = "best"

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"unknown LAPQ init {self.init!r}; expected one of {INITS}")
        if len(self.p_grid) < 3 or any(not p > 0 for p in self.p_grid):
            raise ValueError(f"p_grid needs at least 3 values > 0 to fit a parabola, got {self.p_grid}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown LAPQ loss {self.loss!r}; expected one of {LOSSES}")
        if self.max_evals < 0 or self.powell_iters < 0:
            raise ValueError("max_evals and powell_iters must be >= 0 (0 keeps the Lp init)")
        if not 0 < self.bounds[0] < 1 < self.bounds[1]:
            raise ValueError(f"bounds must satisfy 0 < low < 1 < high, got {self.bounds}")
        if self.powell_samples is not None and self.powell_samples < 1:
            raise ValueError(f"powell_samples must be >= 1 or None, got {self.powell_samples}")


@dataclass
class _Problem:
    """The quantizers being searched, their data and the loss evaluator."""

    quantizers: dict[str, Quantizer]
    data: dict[str, torch.Tensor]  # (C, N) rows the Lp search sees, per quantizer
    cache: _PrefixCache | None = None

    @torch.no_grad()
    def lp_ranges(self, p: float, opts: LAPQOptions) -> dict[str, Range]:
        return {n: lp_search_refined(self.data[n], q.spec, p, opts.coarse, opts.fine)
                for n, q in self.quantizers.items()}

    @torch.no_grad()
    def apply(self, ranges: dict[str, Range], mult: dict[str, float] | None = None) -> None:
        for n, (lo, hi) in ranges.items():
            m = 1.0 if mult is None else mult.get(n, 1.0)
            self.quantizers[n].set_range(lo * m, hi * m)
            if self.cache is not None:
                self.cache.invalidate(n)


class _BudgetExhausted(Exception):
    """Raised inside the objective to stop Powell when the evaluation budget is spent."""


def _check_logits(float_outputs: list[torch.Tensor]) -> None:
    if all_zero(float_outputs):
        raise ValueError("LAPQ needs a calibration loss, but the float model's outputs on the "
                         "calibration set are all zero; make the model (or forward_fn) return "
                         "its logits")


def _labels(data: CalibrationData, kind: str) -> list[torch.Tensor] | None:
    if kind == "kl" or (kind == "auto" and not data.has_labels):
        return None
    labels = [data.labels(b) for b in data]
    if any(y is None for y in labels):
        raise ValueError("LAPQ loss='ce' needs labelled calibration batches (inputs, labels); "
                         "use loss='kl' for unlabeled data")
    return labels  # type: ignore[return-value]


class _PrefixCache:
    """Reuses quantized-layer outputs across loss evaluations on the same batches.

    Layers run in the recorded execution order, so a layer's output depends only on earlier
    layers and its own quantizers: when the first changed quantizer belongs to layer j, layers
    before j return their cached outputs (clones, since models may modify them in place).
    """

    def __init__(self, layers: dict[str, QuantModule]) -> None:
        self.layers = list(layers.values())
        self.index = {name: i for i, name in enumerate(layers)}
        self.valid = 0  # layers [0, valid) have outputs cached for the current quantizers
        self.batch = 0
        self.on = False  # only the evaluator that owns the cache reads or fills it
        self.broken = False  # a layer called twice per batch (shared weights): no caching
        self.called: set[tuple[int, int]] = set()
        self.store: dict[tuple[int, int], torch.Tensor] = {}

    def invalidate(self, quantizer_name: str) -> None:
        self.valid = min(self.valid, self.index[quantizer_name.rsplit(".", 1)[0]])

    def _wrap(self, i: int, layer: QuantModule) -> Callable[..., torch.Tensor]:
        orig = layer.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            key = (i, self.batch)
            if key in self.called:
                self.broken = True
            if not self.on or self.broken:
                return orig(x)
            self.called.add(key)
            if i < self.valid and key in self.store:
                return self.store[key].clone()
            out = orig(x)
            self.store[key] = out.detach().clone()
            return out
        return forward

    @contextmanager
    def active(self) -> Iterator[_PrefixCache]:
        for i, layer in enumerate(self.layers):
            layer.forward = self._wrap(i, layer)  # type: ignore[method-assign]
        try:
            yield self
        finally:
            for layer in self.layers:
                del layer.forward


def _held_out(calib: CalibrationData, skip: int | None) -> CalibrationData | None:
    """The calibration batches that start after the first ``skip`` samples (the ones Powell
    never sees), or None when there are none."""
    if skip is None:
        return None
    batches, seen = [], 0
    for batch in calib.batches:
        if seen >= skip:
            batches.append(batch)
        seen += batch_size_of(batch)
    return CalibrationData(batches, forward_fn=calib.forward_fn) if batches else None


def _evaluator(ctx: Context, kind: str, limit: int | None, cache: _PrefixCache | None = None,
               data: CalibrationData | None = None) -> Callable[[], float]:
    """Calibration loss of the current quantized model on the first ``limit`` calibration
    samples (all when None) or on ``data``; ``cache`` skips unchanged layer prefixes."""
    if data is None:
        data = ctx.calib
        if limit is not None and limit < data.num_samples:
            data = CalibrationData(ctx.calib, limit)
    labels = _labels(data, kind)
    if data is ctx.calib:
        refs = ctx.float_outputs()
    else:
        with quantizers_disabled(ctx.qmodel), torch.no_grad():
            refs = [data.forward(ctx.qmodel, b) for b in data]

    @torch.no_grad()
    def loss() -> float:
        if cache is None:
            return calibration_loss(refs, [data.forward(ctx.qmodel, b) for b in data], labels)
        outs = []
        cache.on, cache.called = True, set()
        try:
            for i, b in enumerate(data):
                cache.batch = i
                outs.append(data.forward(ctx.qmodel, b))
        finally:
            cache.on = False
        cache.valid = 0 if cache.broken else len(cache.layers)
        return calibration_loss(refs, outs, labels)
    return loss


@torch.no_grad()
def _problem(ctx: Context, opts: LAPQOptions) -> _Problem:
    """Every active quantizer with the data its Lp search needs (one float pass for inputs)."""
    layers = ctx.layers()
    mods: dict[str, nn.Module] = dict(layers)
    with quantizers_disabled(ctx.qmodel):
        samples = collect_input_samples(ctx.qmodel, mods, ctx.calib, opts.max_samples, ctx.seed)
    quantizers: dict[str, Quantizer] = {}
    data: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        if layer.w_quant.spec.bits < 16:
            quantizers[name + ".w_quant"] = layer.w_quant
            data[name + ".w_quant"] = layer.weight.detach().reshape(layer.out_channels, -1)
        if layer.a_quant.spec.bits < 16 and name in samples:
            quantizers[name + ".a_quant"] = layer.a_quant
            data[name + ".a_quant"] = samples[name].reshape(1, -1)
    return _Problem(quantizers, data)


def _p_search(prob: _Problem, opts: LAPQOptions,
              loss: Callable[[], float]) -> tuple[dict[str, Range], dict[str, Any]]:
    """Step 1: loss at each p of the grid, parabola vertex p*, the best of them as the init."""
    tried: dict[float, tuple[float, dict[str, Range]]] = {}
    for p in tqdm(opts.p_grid, desc="LAPQ p grid", disable=None, leave=False):
        ranges = prob.lp_ranges(p, opts)
        prob.apply(ranges)
        tried[float(p)] = (loss(), ranges)
    ps = list(tried)
    vertex = parabola_vertex(ps, [tried[p][0] for p in ps])
    if vertex is not None and vertex not in tried:
        ranges = prob.lp_ranges(vertex, opts)
        prob.apply(ranges)
        tried[vertex] = (loss(), ranges)
    best = min(tried, key=lambda p: tried[p][0])
    prob.apply(tried[best][1])
    info = {"p_losses": {f"{p:.3f}": tried[p][0] for p in tried}, "p_vertex": vertex,
            "p_star": best}
    return tried[best][1], info


def _range_step_candidate(ctx: Context, prob: _Problem, w_method: str,
                          a_method: str) -> dict[str, Range]:
    """The ranges the "ranges" step itself sets with these methods (same statistics, samples
    and seed as a recipe with w_range / a_range), read back per quantizer. At 3 bits a
    half-step shift of a zero-point changes the loss a lot, so the candidate must be exactly
    the recipe's, not a re-estimate from LAPQ's smaller Lp sample."""
    opts = RangeOptions(weights=w_method, activations=a_method)
    init_weight_ranges(ctx, opts)
    init_activation_ranges(ctx, opts)
    return {n: q.range() for n, q in prob.quantizers.items()}


def _choose_init(ctx: Context, prob: _Problem, lp_init: dict[str, Range], opts: LAPQOptions,
                 loss: Callable[[], float]) -> tuple[dict[str, Range], dict[str, Any]]:
    """The initial point: Lp at p*, or (init='best') the candidate range set with the lowest
    calibration ``loss``; it is left applied. Returns (ranges, info with every candidate's loss)."""
    candidates = {"lp": lp_init}
    if opts.init == "best":
        for key, (w_method, a_method) in INIT_CANDIDATES.items():
            candidates[key] = _range_step_candidate(ctx, prob, w_method, a_method)
    losses: dict[str, float] = {}
    for key, ranges in candidates.items():
        prob.apply(ranges)
        losses[key] = loss()
    best = min(losses, key=lambda k: losses[k])
    prob.apply(candidates[best])
    return candidates[best], {"init": best, "init_losses": losses, "init_loss": losses[best]}


def _powell(prob: _Problem, init: dict[str, Range], names: list[str], loss: Callable[[], float],
            opts: LAPQOptions) -> tuple[np.ndarray, float, int]:
    """Step 2: Powell over one multiplier per named quantizer, at most ``opts.max_evals`` loss
    evaluations. Returns (best multipliers, best loss, evaluations)."""
    best: dict[str, Any] = {"loss": math.inf, "x": np.ones(len(names)), "evals": 0,
                            "current": np.ones(len(names))}
    bar = tqdm(total=opts.max_evals, desc="LAPQ Powell", disable=None, leave=False)

    def objective(x: np.ndarray) -> float:
        if best["evals"] >= opts.max_evals:
            raise _BudgetExhausted
        changed = [names[i] for i in np.flatnonzero(x != best["current"])]
        prob.apply({n: init[n] for n in changed}, dict(zip(names, x.tolist())))
        best["current"] = x.copy()
        value = loss()
        best["evals"] += 1
        if value < best["loss"]:
            best["loss"], best["x"] = value, x.copy()
        bar.update(1)
        bar.set_postfix(loss=f"{best['loss']:.5f}", refresh=False)
        return value

    try:
        minimize(objective, np.ones(len(names)), method="Powell", bounds=[opts.bounds] * len(names),
                 options={"maxiter": opts.powell_iters, "xtol": opts.xtol, "ftol": 1e-6,
                          "maxfev": opts.max_evals})
    except _BudgetExhausted:
        log.info("LAPQ: evaluation budget of %d spent", opts.max_evals)
    finally:
        bar.close()
    return best["x"], best["loss"], best["evals"]


def _report_layers(ctx: Context, start: str, mult: dict[str, float]) -> None:
    for name in ctx.layers():
        info = ctx.report.layer(name)
        for kind, key in (("w_quant", "w_range"), ("a_quant", "a_range")):
            m = mult.get(f"{name}.{kind}", 1.0)
            info[key] = f"lapq({start}, x{m:.2f})"


@register_step
class LAPQ(Step[LAPQOptions]):
    """Loss-aware clipping: Lp initialisation with a p search, then joint Powell on the loss."""

    name = "lapq"
    Options = LAPQOptions
    effects = frozenset({"tunes_ranges"})

    def run(self, ctx: Context) -> dict[str, Any]:
        opts: LAPQOptions = self.options
        _check_logits(ctx.float_outputs())
        full = _evaluator(ctx, opts.loss, None)
        prob = _problem(ctx, opts)
        cache = prob.cache = _PrefixCache(ctx.layers()) if opts.cache_outputs else None
        with cache.active() if cache is not None else nullcontext():
            sub = _evaluator(ctx, opts.loss, opts.powell_samples, cache)
            lp_init, info = _p_search(prob, opts, sub)
            init, init_info = _choose_init(ctx, prob, lp_init, opts, full)
            info.update(init_info)
            held_data = _held_out(ctx.calib, opts.powell_samples)
            held = _evaluator(ctx, opts.loss, None, data=held_data) if held_data else None
            info["init_held_loss"] = held() if held else None
            names = [n for n, q in prob.quantizers.items() if opts.include_8bit or q.spec.bits < 8]
            # Powell's first sweep follows this order and the budget may end it early: input
            # (activation) clipping usually matters most at low bits, so it goes first.
            names.sort(key=lambda n: not n.endswith(".a_quant"))
            mult: dict[str, float] = {}
            final, evals = info["init_loss"], 0
            if names and opts.max_evals > 0 and opts.powell_iters > 0:
                x, _, evals = _powell(prob, init, names, sub, opts)
                mult = dict(zip(names, x.tolist()))
                prob.apply(init, mult)
                final = full()
                info["final_held_loss"] = held() if held else None
        # Never worse than the initial point on the whole calibration set - nor on the samples
        # Powell did not see (beyond the paper: with ~100 multipliers Powell can overfit its
        # subset; measured on mobilenetv2 W3A3).
        worse_held = held is not None and info.get("final_held_loss") is not None and \
            info["final_held_loss"] > info["init_held_loss"]
        if final > info["init_loss"] or worse_held:
            log.info("LAPQ: Powell result %.5f (held-out %s) worse than its init %.5f (%s); "
                     "keeping the init", final, info.get("final_held_loss"), info["init_loss"],
                     info["init_held_loss"])
            prob.apply(init)
            final, mult = info["init_loss"], {}
        start = f"p={info['p_star']:.2f}" if info["init"] == "lp" else info["init"]
        _report_layers(ctx, start, mult)
        return {**info, "loss": "ce" if _labels(ctx.calib, opts.loss) is not None else "kl",
                "final_loss": final, "evals": evals, "optimised": len(names), "multipliers": mult}
