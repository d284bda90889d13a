"""AdaQuant: layer-wise calibration of weights, bias and quantizer parameters (Hubara et al.).

Per layer, minimise eq. (2) / (D.18) of Hubara et al.

    || W X + b - Q_w(W + V) Q_x(X') - (b + V_b) ||^2

over a continuous weight offset V, a bias offset V_b, the weight quantizer's per-channel step
sizes and zero-points and the input quantizer's step size and zero-point, with Adam and one
learning rate per parameter group. ``X`` is the float layer input; ``X'`` is ``X`` in the
*parallel* mode and the output of the already-quantized prefix in the *sequential* mode
(eq. 3-4), for every calibration batch (CalibTIP swaps in the quantized input for the first
cached batch only).

Target in sequential mode (``target``): "float_model" (default) is the float model's own
activation ``W X + b`` as in eq. (3-4) and CalibTIP's cached float outputs, so layer l also
absorbs the error the quantized prefix has accumulated; "float_layer" is the float layer on the
quantized input, ``W X' + b``, which only asks layer l to undo its own quantization error. In
parallel mode ``X' = X`` and both are the same.

Parametrisation (decides what the learning rates mean; Adam moves each parameter by about
``lr`` per step whatever the gradient scale, so every group is expressed in natural units):

* weight:  W + s_w0 * v           v per element, in units of the initial per-channel step s_w0
* bias:    b + v_b                real units (as in the paper)
* w step:  s_w0 * exp(u_w)        u_w per channel: lr is a relative change of the step size
* w zp:    z_w0 + d_w             grid units (LSB), rounded with a straight-through estimator
* x step:  s_x0 * exp(u_x)        relative, per tensor
* x zp:    z_x0 + d_x             grid units

The best iterate (by MSE over all cached samples, evaluated every ``eval_every`` steps and at
the end; the starting point is a candidate) is written back, so MSE after <= MSE before.

Start point (``start``). AdaQuant moves each step size only a little from where it starts
(lr_w_qparams / lr_a_qparams are relative changes per step), so the starting ranges matter. With
``start="best"`` (default) the step first compares, by KL(float || quantized) of the model
outputs on the calibration set, the ranges the model has (the recipe's) with the MSE ranges and
the ACIQ ranges (min-max weights, ACIQ activations), and starts from the lowest: the candidates
of LAPQ's ``init="best"``. The check costs one float pass over the calibration set (activation
statistics) plus one quantized pass per candidate. ``start="given"`` skips it, and so does a step
that runs after any step other than the range initialisation (bias correction, bit allocation,
LAPQ...): candidates set from scratch would discard that step's ranges.

Held-out selection (``holdout``). When the calibration set has fewer samples than a layer has
weights per output channel (its fan-in, C_in / groups * k^2), choosing the iterate on the data it
was fitted to cannot see over-fitting. ``holdout="auto"`` (default) then holds out part of that
layer's data; the fit uses the rest and the iterate is chosen on the held-out part (starting
point included, and only iterates whose MSE over all cached data is <= the start's):

* ``holdout_fraction`` of the samples, when the layer has at least ``MIN_HOLDOUT_SAMPLES`` (4);
* otherwise ``holdout_fraction`` of the output positions (conv: H*W; linear on sequences: tokens),
  when every sample has at least ``MIN_HOLDOUT_POSITIONS`` (64, an 8x8 map) of them (positions of
  one image are not independent samples, hence the floor);
* otherwise nothing can be validated and the layer is left as it is (``holdout="frozen"``).

Engaged, it also limits what is learned (``freeze_underdetermined``): when the fit has fewer
target values per output channel (fit samples x output positions) than the layer's fan-in (the
over-fitting bound of appendix A, B >= C_in k^2 / (H W)), the weight offset is not learned
(lr_weight 0), only the bias and the quantizer parameters. ``holdout="never"`` restores the plain
best-iterate rule everywhere, ``"always"`` engages the hold-out for every layer. The evidence
for these defaults is in docs/methods.md.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calib.cache import ActivationCache
from ..calib.data import CalibrationData
from ..calib.engine import SegmentEngine
from ..core.primitives import EPS, fake_quantize
from ..core.quantizer import Quantizer
from ..nn.control import quantizers_disabled
from ..nn.modules import QuantLinear, QuantModule
from .base import STEPS, Context, Step, all_zero, calibration_kl, register_step
from .range_init import choose_start_ranges

__all__ = ["AdaQuantOptions", "LayerStats", "adaquant_layer", "layer_mse", "capture_layer_input",
           "collect_layer_io", "AdaQuant"]

log = logging.getLogger(__name__)

Pair = tuple[torch.Tensor, ...]  # (x_in, y_target)
TARGETS = ("float_model", "float_layer")
HOLDOUTS = ("auto", "always", "never")
STARTS = ("best", "given")
# Effects after which the layers' quantizer ranges are still the range initialisation's own. After
# a step with any other effect (bias correction, bit allocation, LAPQ, ...) they carry that step's
# work, which candidate ranges set from scratch would throw away, so start="best" then keeps the
# given ranges.
START_KEEPS = frozenset({"initialises_ranges", "quantizes_embeddings"})
MIN_HOLDOUT_SAMPLES = 4  # fewer samples: hold out output positions instead
MIN_HOLDOUT_POSITIONS = 64  # fewer positions per sample too: nothing to validate on, layer kept


@dataclass(frozen=True)
class AdaQuantOptions:
    """Options of the "adaquant" step (learning rates in the units of the module docstring).

    mode: "sequential" (inputs from the quantized prefix) or "parallel" (float inputs).
    target: "float_model" (the float model's activation, eq. 3-4) or "float_layer" (the float
    layer applied to the quantized-prefix input); only matters in sequential mode.
    iters / batch_size: Adam steps per layer and samples per step (paper: batch 50).
    lr_weight: weight offset, LSB per step; lr_bias: real units; lr_w_qparams / lr_a_qparams:
    relative step-size change and zero-point LSB per step for the weight / input quantizer.
    eval_every: steps between full-cache MSE checks that choose the best iterate.
    memory_budget_mb: activations of one layer kept in memory; the rest spills to ``spill_dir``.
    holdout: "auto" (hold out data when samples < the layer's fan-in, see the module docstring),
    "always" or "never"; holdout_fraction: share of samples / output positions held out;
    freeze_underdetermined: when held out, keep the weights (learn only bias and quantizer
    parameters) if the fit has fewer target values per output channel than the fan-in.
    start: "best" (the step first keeps the model's ranges or switches to another range set,
    whichever has the lower calibration KL; only right after range initialisation, see the module
    docstring) or "given" (start from the model's ranges as they are). Only the step uses it;
    ``adaquant_layer`` starts from the layer.

    Defaults: the paper's Adam learning rates translated to this parametrisation and checked on
    layer MSE of calibration data (fmnist-resnet20 proxy): lr_weight 1e-2 LSB, lr_bias 1e-3,
    lr_w_qparams 1e-3, lr_a_qparams 1e-2. 100 iterations (the paper uses 100, the authors' code
    1000): on the proxy 200 iterations lowered layer MSE only 0-6% more than 100, and 100 keeps
    full sequential AdaQuant of fmnist-resnet20 on 1000 images within the 3-minute budget.
    """

    mode: str = "sequential"
    target: str = "float_model"
    iters: int = 100
    batch_size: int = 50
    lr_weight: float = 1e-2
    lr_bias: float = 1e-3
    lr_w_qparams: float = 1e-3
    lr_a_qparams: float = 1e-2
    eval_every: int = 25
    memory_budget_mb: float = 1024.0
    spill_dir: str | None = None
    holdout: str = "auto"
    holdout_fraction: float = 0.25
    freeze_underdetermined: bool = True
    start: str = "best"

    def __post_init__(self) -> None:
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.mode not in ("sequential", "parallel"):
            raise ValueError(f"mode must be 'sequential' or 'parallel', got {self.mode!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.holdout not in HOLDOUTS:
            raise ValueError(f"holdout must be one of {', '.join(HOLDOUTS)}, got {self.holdout!r}")
        if not 0.0 < float(self.holdout_fraction) < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        for key in ("iters", "batch_size", "eval_every"):
            if int(getattr(self, key)) < (0 if key == "iters" else 1):
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)}")
        for key in ("lr_weight", "lr_bias", "lr_w_qparams", "lr_a_qparams", "memory_budget_mb"):
            if float(getattr(self, key)) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class LayerStats:
    """Outcome of AdaQuant on one layer: MSE over all cached samples before and after, and which
    data chose the iterate ("none": all of it; "samples" / "positions": a held-out part, whose
    MSE before / after is ``heldout_before`` / ``heldout_after``; "frozen": left unchanged)."""

    mse_before: float
    mse_after: float
    iters: int
    best_iter: int
    seconds: float
    samples: int
    holdout: str = "none"
    heldout_before: float | None = None
    heldout_after: float | None = None
    fit_constraints: int | None = None
    weights_frozen: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _per_channel(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def _fq(q: Quantizer, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """What ``q.forward`` computes, with scale / zero-point given explicitly."""
    if not q.active:
        return x
    return fake_quantize(x, scale.clamp(min=EPS), zp.clamp(q.spec.qmin, q.spec.qmax), q.spec)


class _Reparam:
    """The layer in the AdaQuant parametrisation (see module docstring); the layer is read only
    until ``write`` copies an iterate back into it."""

    def __init__(self, layer: QuantModule) -> None:
        self.layer = layer
        self.w0 = layer.weight.detach().clone()
        self.b0 = layer.bias.detach().clone() if layer.bias is not None else None
        self.sw0, self.zw0 = (t.detach().clone() for t in (layer.w_quant.scale, layer.w_quant.zero_point))
        self.sa0, self.za0 = (t.detach().clone() for t in (layer.a_quant.scale, layer.a_quant.zero_point))
        z = torch.zeros
        self.v = z(self.w0.shape, requires_grad=True)
        self.vb = z(self.w0.shape[0], requires_grad=True)
        self.u_w, self.d_w = z(self.sw0.shape, requires_grad=True), z(self.zw0.shape, requires_grad=True)
        self.u_a, self.d_a = z(self.sa0.shape, requires_grad=True), z(self.za0.shape, requires_grad=True)

    def groups(self, opts: AdaQuantOptions) -> list[dict[str, Any]]:
        return [{"params": [self.v], "lr": opts.lr_weight},
                {"params": [self.vb], "lr": opts.lr_bias},
                {"params": [self.u_w, self.d_w], "lr": opts.lr_w_qparams},
                {"params": [self.u_a, self.d_a], "lr": opts.lr_a_qparams}]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor, torch.Tensor]:
        """(weight, bias, w_scale, w_zp, a_scale, a_zp) of the current iterate."""
        w = self.w0 + _per_channel(self.sw0, self.w0) * self.v
        b = self.vb if self.b0 is None else self.b0 + self.vb
        return (w, b, self.sw0 * torch.exp(self.u_w), self.zw0 + self.d_w,
                self.sa0 * torch.exp(self.u_a), self.za0 + self.d_a)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b, sw, zw, sa, za = self.tensors()
        lay = self.layer
        return lay.op(_fq(lay.a_quant, x, sa, za), _fq(lay.w_quant, w, sw, zw), b)

    @torch.no_grad()
    def snapshot(self) -> list[torch.Tensor]:
        return [t.detach().clone() for t in (self.v, self.vb, self.u_w, self.d_w, self.u_a, self.d_a)]

    @torch.no_grad()
    def load(self, snap: list[torch.Tensor]) -> None:
        for t, s in zip((self.v, self.vb, self.u_w, self.d_w, self.u_a, self.d_a), snap):
            t.copy_(s)

    @torch.no_grad()
    def write(self) -> None:
        """Copy the current iterate into the layer (zero-points stored rounded)."""
        w, b, sw, zw, sa, za = self.tensors()
        lay = self.layer
        lay.weight.copy_(w)
        if self.b0 is not None or bool(self.vb.abs().max() > 0):
            lay.ensure_bias().copy_(b)
        lay.w_quant.scale.copy_(sw)
        lay.w_quant.zero_point.copy_(torch.round(zw).clamp(lay.w_quant.spec.qmin, lay.w_quant.spec.qmax))
        lay.a_quant.scale.copy_(sa)
        lay.a_quant.zero_point.copy_(torch.round(za).clamp(lay.a_quant.spec.qmin, lay.a_quant.spec.qmax))


@torch.no_grad()
def _mse(fn: Any, data: Sequence[Pair]) -> float:
    """Mean squared error over every element of every cached pair."""
    total, count = 0.0, 0
    for x, y in data:
        total += float(F.mse_loss(fn(x), y, reduction="sum"))
        count += y.numel()
    return total / max(count, 1)


def layer_mse(layer: QuantModule, data: Sequence[Pair]) -> float:
    """MSE between ``layer(x)`` (quantized) and ``y`` over a sequence of (x, y) pairs."""
    return _mse(layer, data)


def _sample(data: Sequence[Pair], batch_size: int, gen: torch.Generator) -> Pair:
    """A random mini-batch: a random cached chunk, then random samples of that chunk."""
    x, y = data[int(torch.randint(len(data), (1,), generator=gen))]
    if x.shape[0] <= batch_size:
        return x, y
    idx = torch.randperm(x.shape[0], generator=gen)[:batch_size]
    return x[idx], y[idx]


def _as_pairs(x_in: torch.Tensor | Sequence[Pair], y_target: torch.Tensor | None) -> Sequence[Pair]:
    if isinstance(x_in, torch.Tensor):
        if y_target is None or y_target.shape[0] != x_in.shape[0]:
            raise ValueError("adaquant_layer: with a tensor x_in, pass y_target with the same number "
                             f"of samples (got x_in {tuple(x_in.shape)}, y_target "
                             f"{None if y_target is None else tuple(y_target.shape)})")
        return [(x_in.detach(), y_target.detach())]
    if y_target is not None:
        raise ValueError("adaquant_layer: pass y_target only with a tensor x_in; a sequence of "
                         "(x, y) pairs already holds the targets")
    return x_in


@dataclass
class _Split:
    """Held-out elements of each cached chunk: ``masks[i]`` is a bool tensor broadcastable to
    chunk i's target (True = held out); kind "samples" masks (n_i, 1, ...), "positions" masks
    the output positions of every sample."""

    kind: str
    masks: list[torch.Tensor]

    def fit_chunks(self) -> list[int]:
        return [i for i, m in enumerate(self.masks) if not bool(m.all())]


def _num_samples(data: Sequence[Pair]) -> int:
    n = getattr(data, "num_samples", None)
    return int(n) if n is not None else sum(int(x.shape[0]) for x, _ in data)


def _position_shape(layer: QuantModule, y: torch.Tensor) -> tuple[int, ...]:
    """Mask shape over the output positions of one sample: conv (1, 1, *spatial), linear
    (1, *tokens, 1); the channel dimension is 1 for convolutions and -1 for linear layers."""
    if isinstance(layer, QuantLinear):
        return (1, *y.shape[1:-1], 1)
    return (1, 1, *y.shape[2:])


def _holdout_kind(layer: QuantModule, data: Sequence[Pair], opts: AdaQuantOptions) -> str:
    """"none", "samples", "positions" or "frozen" (the rule of the module docstring)."""
    n = _num_samples(data)
    if opts.holdout == "never" or (opts.holdout == "auto" and n >= layer.weight[0].numel()):
        return "none"
    if n >= MIN_HOLDOUT_SAMPLES:
        return "samples"
    positions = min(math.prod(_position_shape(layer, y)) for _, y in data) if len(data) else 0
    return "positions" if positions >= MIN_HOLDOUT_POSITIONS else "frozen"


def _held_count(total: int, fraction: float) -> int:
    """Held-out count: ``fraction`` of ``total`` rounded, at least 1 and leaving at least 1."""
    return min(max(1, round(fraction * total)), total - 1)


def _make_split(layer: QuantModule, data: Sequence[Pair], kind: str, fraction: float,
                gen: torch.Generator) -> _Split:
    """Random held-out samples (over the whole cache) or output positions (per chunk)."""
    if kind == "samples":
        n = _num_samples(data)
        held = torch.zeros(n, dtype=torch.bool)
        held[torch.randperm(n, generator=gen)[:_held_count(n, fraction)]] = True
        masks, k = [], 0
        for _, y in data:
            masks.append(held[k:k + y.shape[0]].reshape(-1, *([1] * (y.dim() - 1))))
            k += y.shape[0]
        return _Split(kind, masks)
    masks = []
    for _, y in data:
        shape = _position_shape(layer, y)
        flat = torch.zeros(math.prod(shape), dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=gen)[:_held_count(flat.numel(), fraction)]] = True
        masks.append(flat.reshape(shape))
    return _Split(kind, masks)


@torch.no_grad()
def _split_mse(fn: Any, data: Sequence[Pair], split: _Split) -> tuple[float, float]:
    """(MSE over every cached element, MSE over the held-out elements)."""
    total, count, held, held_count = 0.0, 0, 0.0, 0
    for (x, y), mask in zip(data, split.masks):
        err = (fn(x) - y) ** 2
        total += float(err.sum())
        count += err.numel()
        m = mask.expand_as(err)
        held += float(err[m].sum())
        held_count += int(m.sum())
    return total / max(count, 1), held / max(held_count, 1)


def _fit_constraints(layer: QuantModule, data: Sequence[Pair], split: _Split) -> int:
    """Fit (non-held-out) target values per output channel: samples x output positions."""
    total = 0
    for (_, y), held in zip(data, split.masks):
        positions = math.prod(_position_shape(layer, y))
        per_sample = positions - int(held.sum()) if split.kind == "positions" else positions
        samples = int((~held).sum()) if split.kind == "samples" else int(y.shape[0])
        total += samples * per_sample
    return total


def _fit_sample(data: Sequence[Pair], split: _Split, chunks: list[int], batch_size: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random mini-batch of fit data: (x, y, keep), keep = bool mask of the fit elements."""
    i = chunks[int(torch.randint(len(chunks), (1,), generator=gen))]
    (x, y), held = data[i], split.masks[i]
    if split.kind == "samples":
        idx = torch.nonzero(~held.flatten()).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)[:batch_size]]
        return x[idx], y[idx], torch.ones((1,) * y.dim(), dtype=torch.bool)
    if x.shape[0] > batch_size:
        idx = torch.randperm(x.shape[0], generator=gen)[:batch_size]
        x, y = x[idx], y[idx]
    return x, y, ~held


def _descend(rep: _Reparam, opts: AdaQuantOptions, draw: Callable[[], torch.Tensor],
             score: Callable[[], float]) -> tuple[int, float, float]:
    """Adam on ``rep``; ``draw()`` -> loss of a fresh mini-batch, ``score()`` -> value to minimise,
    checked every ``eval_every`` steps and at the end. Loads the best iterate (the start is a
    candidate) into ``rep``; returns (best iteration, start score, best score)."""
    best_score = first = score()
    best, best_iter = rep.snapshot(), 0
    with torch.enable_grad():
        opt = torch.optim.Adam(rep.groups(opts))
        for it in range(1, opts.iters + 1):
            loss = draw()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % opts.eval_every == 0 or it == opts.iters:
                s = score()
                if s < best_score:
                    best_score, best, best_iter = s, rep.snapshot(), it
    rep.load(best)
    return best_iter, first, best_score


def _fit_all(rep: _Reparam, data: Sequence[Pair], opts: AdaQuantOptions,
             gen: torch.Generator) -> dict[str, Any]:
    """Fit and choose the iterate on all cached data (the plain rule)."""
    def draw() -> torch.Tensor:
        x, y = _sample(data, opts.batch_size, gen)
        return F.mse_loss(rep(x), y)

    best_iter, before, after = _descend(rep, opts, draw, lambda: _mse(rep, data))
    return {"mse_before": before, "mse_after": after, "best_iter": best_iter}


def _fit_heldout(rep: _Reparam, data: Sequence[Pair], split: _Split, opts: AdaQuantOptions,
                 gen: torch.Generator) -> dict[str, Any]:
    """Fit on the non-held-out part; choose the iterate with the lowest held-out MSE among those
    whose MSE over all cached data is <= the start's."""
    chunks = split.fit_chunks()
    before, held_before = _split_mse(rep, data, split)

    def draw() -> torch.Tensor:
        x, y, keep = _fit_sample(data, split, chunks, opts.batch_size, gen)
        return ((rep(x) - y) ** 2)[keep.expand_as(y)].mean()

    def score() -> float:
        total, held = _split_mse(rep, data, split)
        return held if total <= before else math.inf

    best_iter, _, held_after = _descend(rep, opts, draw, score)
    return {"mse_before": before, "mse_after": _split_mse(rep, data, split)[0],
            "best_iter": best_iter, "holdout": split.kind, "heldout_before": held_before,
            "heldout_after": held_after}


def adaquant_layer(layer: QuantModule, x_in: torch.Tensor | Sequence[Pair],
                   y_target: torch.Tensor | None = None, options: AdaQuantOptions | None = None,
                   generator: torch.Generator | None = None) -> LayerStats:
    """AdaQuant on one layer in place (eq. 2 of Hubara et al.), for its current bit widths.

    x_in: (N, C_in, ...) layer inputs with y_target (N, C_out, ...) float outputs ``W X + b``, or
    a sequence of (x, y) chunks (an ActivationCache). The layer's weight, bias and quantizer
    parameters are replaced by the chosen iterate (on all data, or on held-out data when the
    ``holdout`` rule engages); MSE over all cached data after <= before, always.
    """
    opts = options or AdaQuantOptions()
    data = _as_pairs(x_in, y_target)
    gen = generator or torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    rep = _Reparam(layer)
    kind = _holdout_kind(layer, data, opts)
    if kind == "frozen":
        mse = _mse(rep, data)
        return LayerStats(mse, mse, 0, 0, time.perf_counter() - t0, _num_samples(data), "frozen")
    if kind == "none":
        res = _fit_all(rep, data, opts, gen)
    else:
        split = _make_split(layer, data, kind, opts.holdout_fraction, gen)
        constraints = _fit_constraints(layer, data, split)
        freeze = opts.freeze_underdetermined and constraints < layer.weight[0].numel()
        res = _fit_heldout(rep, data, split, dataclasses.replace(opts, lr_weight=0.0) if freeze
                           else opts, gen)
        res.update(fit_constraints=constraints, weights_frozen=freeze)
    rep.write()
    return LayerStats(iters=opts.iters, seconds=time.perf_counter() - t0,
                      samples=_num_samples(data), **res)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted layer input is recorded."""


@torch.no_grad()
def capture_layer_input(model: nn.Module, layer: nn.Module, calib: CalibrationData,
                        batch: Any) -> torch.Tensor:
    """Input of ``layer`` for one batch; the forward pass stops at the layer (nothing after it
    runs). Raises ValueError if the model never calls the layer."""
    got: list[torch.Tensor] = []

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0].detach())
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook)
    try:
        calib.forward(model, batch)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not got:
        raise ValueError(f"the model never called layer {type(layer).__name__} on this batch; "
                         "AdaQuant needs every selected layer to run in the forward pass")
    return got[0]


@torch.no_grad()
def collect_layer_io(name: str, qmodel: nn.Module, reference: nn.Module, calib: CalibrationData,
                     sequential: bool, cache: ActivationCache,
                     target: str = "float_model") -> ActivationCache:
    """Fill ``cache`` with (layer input, float target) per calibration batch for layer ``name``.

    reference: a float copy of the model taken before any layer was changed (quantizers off).
    The input is the float input (parallel) or the input produced by ``qmodel``'s quantized
    prefix, recomputed for every batch (sequential). The target is the float layer applied to
    the float input (``target="float_model"``: the float model's activation, eq. 3-4) or, in
    sequential mode with ``target="float_layer"``, to the quantized-prefix input.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    ref_layer, q_layer = reference.get_submodule(name), qmodel.get_submodule(name)
    if not isinstance(ref_layer, QuantModule):
        raise ValueError(f"{name!r} is a {type(ref_layer).__name__}, expected a quantized layer")
    for batch in calib:
        x_q = capture_layer_input(qmodel, q_layer, calib, batch) if sequential else None
        if x_q is not None and target == "float_layer":
            x_ref = x_q
        else:
            x_ref = capture_layer_input(reference, ref_layer, calib, batch)
        cache.append(x_ref if x_q is None else x_q, ref_layer.op(x_ref, ref_layer.weight, ref_layer.bias))
    return cache


class _LayerWalk:
    """Layer inputs and float targets from the segment engine: the float and (sequential mode)
    the quantized model are each walked once, layer by layer, in graph order. Gives the same
    (input, target) pairs as :func:`collect_layer_io` in O(L) segment passes instead of O(L^2)."""

    def __init__(self, ref_engine: SegmentEngine, q_engine: SegmentEngine | None,
                 order: list[str], target: str) -> None:
        self.ref_engine, self.q_engine, self.order, self.target = ref_engine, q_engine, order, target
        self.ref_front = ref_engine.start()
        self.q_front = q_engine.start() if q_engine is not None else None

    @classmethod
    def build(cls, ctx: Context, ref: nn.Module, layers: list[str],
              opts: AdaQuantOptions) -> _LayerWalk | None:
        budget = int(opts.memory_budget_mb * (1 << 20))
        ref_engine = SegmentEngine.build(ref, ctx.calib, budget, opts.spill_dir)
        if ref_engine is None:
            return None
        q_engine = None
        if opts.mode == "sequential":
            q_engine = SegmentEngine.build(ctx.qmodel, ctx.calib, budget, opts.spill_dir)
            if q_engine is None:
                return None
        order = [n for n in ref_engine.layers_in_order() if n in set(layers)]
        if set(order) != set(layers):
            log.info("AdaQuant: some layers are not nodes of the traced graph; full passes")
            return None
        return cls(ref_engine, q_engine, order, opts.target)

    @torch.no_grad()
    def collect(self, name: str, cache: ActivationCache) -> None:
        """Append (layer input, float target) per batch for layer ``name`` (next in order)."""
        self.ref_front = self.ref_engine.advance(self.ref_front, name)
        ref_layer = self.ref_engine.model.get_submodule(name)
        assert isinstance(ref_layer, QuantModule)
        x_ref = self.ref_engine.layer_inputs(self.ref_front, name)
        if self.q_engine is None or self.q_front is None:
            for x in x_ref:
                cache.append(x, ref_layer.op(x, ref_layer.weight, ref_layer.bias))
            return
        self.q_front = self.q_engine.advance(self.q_front, name)
        x_q = self.q_engine.layer_inputs(self.q_front, name)
        for xf, xq in zip(x_ref, x_q):
            x_t = xq if self.target == "float_layer" else xf
            cache.append(xq, ref_layer.op(x_t, ref_layer.weight, ref_layer.bias))

    def close(self) -> None:
        self.ref_front.close()
        if self.q_front is not None:
            self.q_front.close()


@contextmanager
def _float_reference(qmodel: nn.Module) -> Iterator[nn.Module]:
    """A frozen float copy of the model as it is now, with every quantizer off."""
    ref = copy.deepcopy(qmodel)
    with quantizers_disabled(ref):
        yield ref


@register_step
class AdaQuant(Step[AdaQuantOptions]):
    """Runs AdaQuant layer by layer in execution order (sequential or parallel mode)."""

    name = "adaquant"
    Options = AdaQuantOptions
    effects = frozenset({"tunes_ranges", "changes_weights"})

    def run(self, ctx: Context) -> dict[str, Any]:
        opts: AdaQuantOptions = self.options
        ctx.float_outputs()  # later steps need the float logits of the unchanged weights
        earlier = [s["step"] for s in ctx.report.steps
                   if s["step"] not in STEPS or STEPS[s["step"]].effects - START_KEEPS]
        if opts.start == "given":
            start: dict[str, Any] = {"start": "given"}
        elif earlier:
            log.info("AdaQuant starts from the ranges left by %s (start='best' only compares range "
                     "sets right after range initialisation)", ", ".join(earlier))
            start = {"start": "given", "start_kept_after": earlier}
        else:
            start = self._choose_start(ctx)
        layers = {n: m for n, m in ctx.layers().items() if m.w_quant.active or m.a_quant.active}
        gen = torch.Generator().manual_seed(ctx.seed)
        done: list[str] = []
        peak = {"memory_bytes": 0, "disk_bytes": 0}
        try:
            with _float_reference(ctx.qmodel) as ref:
                walk = _LayerWalk.build(ctx, ref, list(layers), opts)
                order = walk.order if walk is not None else list(layers)
                for name in tqdm(order, desc=f"adaquant ({opts.mode})", disable=None):
                    t0 = time.perf_counter()
                    stats = self._one_layer(ctx, ref, name, gen, peak, walk)
                    ctx.report.layer(name)["adaquant"] = {
                        **stats.to_dict(), "total_seconds": time.perf_counter() - t0}
                    done.append(name)
                if walk is not None:
                    walk.close()
        except KeyboardInterrupt:
            msg = (f"AdaQuant interrupted after {len(done)} of {len(layers)} layers"
                   f"{' (last finished: ' + done[-1] + ')' if done else ''}; the model passed to "
                   "quantize() is untouched (ptqkit works on a copy)")
            log.warning(msg)
            raise KeyboardInterrupt(msg) from None
        return {**start, **self._summary(ctx, done, peak)}

    @staticmethod
    def _choose_start(ctx: Context) -> dict[str, Any]:
        if all_zero(ctx.float_outputs()):
            log.warning("AdaQuant start='best' needs the model's outputs to compare range sets, "
                        "but the float outputs on the calibration set are all zero; starting from "
                        "the given ranges")
            return {"start": "given"}
        info = choose_start_ranges(ctx, lambda: calibration_kl(ctx))
        log.info("AdaQuant starts from the %s ranges (calibration KL %s)", info["start"],
                 ", ".join(f"{k} {v:.4g}" for k, v in info["start_losses"].items()))
        return info

    def _one_layer(self, ctx: Context, ref: nn.Module, name: str, gen: torch.Generator,
                   peak: dict[str, int], walk: _LayerWalk | None) -> LayerStats:
        opts: AdaQuantOptions = self.options
        budget = int(opts.memory_budget_mb * (1 << 20))
        with ActivationCache(budget, opts.spill_dir) as cache:
            if walk is not None:
                walk.collect(name, cache)
            else:
                collect_layer_io(name, ctx.qmodel, ref, ctx.calib, opts.mode == "sequential",
                                 cache, opts.target)
            peak["memory_bytes"] = max(peak["memory_bytes"], cache.memory_bytes)
            peak["disk_bytes"] = max(peak["disk_bytes"], cache.disk_bytes)
            stats = adaquant_layer(ctx.layers()[name], cache, None, opts, gen)
        log.info("adaquant %s: mse %.4g -> %.4g (%d iters, %.1fs, held out: %s)", name,
                 stats.mse_before, stats.mse_after, stats.iters, stats.seconds, stats.holdout)
        return stats

    def _summary(self, ctx: Context, done: list[str], peak: dict[str, int]) -> dict[str, Any]:
        per_layer = [ctx.report.layer(n)["adaquant"] for n in done]
        return {"mode": self.options.mode, "target": self.options.target,
                "iters": self.options.iters, "layers": len(done),
                "mse_before_sum": sum(s["mse_before"] for s in per_layer),
                "mse_after_sum": sum(s["mse_after"] for s in per_layer),
                "holdout_layers": {k: sum(s.get("holdout") == k for s in per_layer)
                                   for k in ("none", "samples", "positions", "frozen")},
                "cache_peak_memory_mb": peak["memory_bytes"] / (1 << 20),
                "cache_peak_disk_mb": peak["disk_bytes"] / (1 << 20)}
