"""Batch-norm tuning (Hubara et al., section 3.3 and appendix B).

BN folded into a layer is reconstructed as the identity from the kept (gamma_o, beta_o, eps):

    mu = beta_r = beta_o,   sigma^2 = gamma_o^2,   gamma_r = sqrt(gamma_o^2 + eps)      (B.10-B.11)

so that gamma_r (y - mu) / sqrt(sigma^2 + eps) + beta_r = y. Its statistics are then re-estimated
on the calibration data with the *quantized* model (forward passes only, BN in training mode,
statistics reset and averaged cumulatively - momentum=None - not CalibTIP's single pass at
momentum 0.1), and the BN is folded again (B.12-B.13):

    f = gamma_r / sqrt(var + eps),  W' = f W,  b' = f (b - mu) + beta_r,  s_w' = f s_w

with the weight zero-point unchanged, so the integer weights round(W'/s_w') stay the same.

Target statistics (``target``): ``"bn"`` is the paper's identity reconstruction above, which
restores the folded BN's *training* running statistics. ``"float"`` normalises to the float
model's own statistics of the same layer on the same calibration data, gamma_r = sqrt(var_f + eps),
beta_r = mu_f, so only the quantization-induced shift of mean and variance is removed and an
unquantized model is left unchanged. ``"best"`` (default) tries both and keeps the one with the
lower calibration KL. With ``guard`` (default) the step is undone bit-exactly if it raises the
calibration KL. The evidence for these defaults is in docs/methods.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calib.data import CalibrationData
from ..nn.control import quantizers_disabled
from ..nn.modules import FoldedBN, QuantModule, quant_layers
from .base import Context, Step, calibration_kl, register_step

__all__ = ["identity_bn", "batch_moments", "bn_train_forward", "refold", "BNStats",
           "BNTuningHandle", "tune_batchnorm", "float_moments", "BNTuningOptions", "BNTuning",
           "TARGETS"]

log = logging.getLogger(__name__)

TARGETS = ("best", "float", "bn")
# (gamma_r, beta_r) of the reconstructed BN of every layer, each (C,)
Targets = dict[str, tuple[torch.Tensor, torch.Tensor]]


def identity_bn(folded: FoldedBN) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gamma_r, beta_r, mu, sigma^2), each (C,), of the BN that is the identity after the folded
    layer (appendix B): mu = beta_r = beta_o, sigma^2 = gamma_o^2, gamma_r = sqrt(gamma_o^2 + eps)."""
    g, b = folded.gamma.float(), folded.beta.float()
    return torch.sqrt(g * g + folded.eps), b.clone(), b.clone(), g * g


def batch_moments(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, biased and unbiased variance of y (N, C, ...) over all dims but 1."""
    dims = [d for d in range(y.dim()) if d != 1]
    n = y.numel() // y.shape[1]
    mean = y.mean(dims)
    var = y.var(dims, unbiased=False)
    return mean, var, var * n / (n - 1) if n > 1 else var


def _channel(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (y.dim() - 2)))


def bn_train_forward(y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                     eps: float) -> torch.Tensor:
    """Training-mode BN of y (N, C, ...): normalised with the batch's own (biased) statistics."""
    mean, var, _ = batch_moments(y)
    return _channel(gamma, y) * (y - _channel(mean, y)) / torch.sqrt(_channel(var, y) + eps) \
        + _channel(beta, y)


@dataclass
class BNStats:
    """Cumulative average of per-batch statistics (what BatchNorm does with momentum=None):
    mean of batch means, mean of batch unbiased variances."""

    channels: int
    sum_mean: torch.Tensor = field(init=False)
    sum_var: torch.Tensor = field(init=False)
    batches: int = 0

    def __post_init__(self) -> None:
        self.sum_mean = torch.zeros(self.channels)
        self.sum_var = torch.zeros(self.channels)

    def update(self, y: torch.Tensor) -> None:
        mean, _, var_unbiased = batch_moments(y.detach().float())
        self.sum_mean += mean
        self.sum_var += var_unbiased
        self.batches += 1

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batches == 0:
            raise ValueError("no batch reached this layer; BN statistics cannot be estimated")
        return self.sum_mean / self.batches, self.sum_var / self.batches


def refold(weight: torch.Tensor, bias: torch.Tensor, w_scale: torch.Tensor, gamma_r: torch.Tensor,
           beta_r: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold BN (gamma_r, beta_r, mean, var, eps) into a layer (eq. B.12-B.13).

    weight (C, ...), bias (C,), w_scale (C,) per-channel step sizes. Returns (W', b', s_w') with
    W' = f W, b' = f (b - mean) + beta_r, s_w' = f s_w, f = gamma_r / sqrt(var + eps) > 0.
    """
    f = gamma_r / torch.sqrt(var + eps)
    w = weight * f.reshape(-1, *([1] * (weight.dim() - 1)))
    return w, f * (bias - mean) + beta_r, w_scale * f


@dataclass
class BNTuningHandle:
    """Undo handle: ``undo()`` restores every changed tensor bit-exactly."""

    saved: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    @torch.no_grad()
    def undo(self) -> None:
        for pairs in self.saved.values():
            for target, original in pairs:
                target.copy_(original)
        self.saved.clear()

    @property
    def layers(self) -> list[str]:
        return list(self.saved)


def _tensors(layer: QuantModule) -> list[torch.Tensor]:
    return [layer.weight, layer.ensure_bias(), layer.w_quant.scale, layer.w_quant.zero_point]


@contextmanager
def _reconstructed_bn(layers: dict[str, QuantModule], targets: Targets | None = None,
                      apply: bool = True) -> Iterator[dict[str, BNStats]]:
    """Forward hooks that accumulate each layer's output statistics and (``apply``) put the
    reconstructed BN (gamma_r, beta_r from ``targets``, default the identity of appendix B) in
    training mode after it; removed on exit."""
    stats: dict[str, BNStats] = {}
    handles = []
    for name, layer in layers.items():
        if layer.folded_bn is None:
            continue
        gamma_r, beta_r = targets[name] if targets else identity_bn(layer.folded_bn)[:2]
        stats[name] = BNStats(layer.out_channels)
        eps = layer.folded_bn.eps

        def hook(mod: nn.Module, args: Any, out: torch.Tensor, s: BNStats = stats[name],
                 g: torch.Tensor = gamma_r, b: torch.Tensor = beta_r,
                 e: float = eps) -> torch.Tensor | None:
            s.update(out)
            return bn_train_forward(out, g, b, e) if apply else None

        handles.append(layer.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def float_moments(model: nn.Module, calib: CalibrationData,
                  float_model: AbstractContextManager[Any] | None = None) -> Targets:
    """(gamma_r, beta_r) = (sqrt(var_f + eps), mu_f) per BN-folded layer: the float model's
    output statistics on the calibration data (cumulative averages as in ``BNStats``).

    ``float_model``: a context in which ``model`` computes the float function (default: its
    quantizers off, i.e. its current float weights)."""
    layers = {n: m for n, m in quant_layers(model).items() if m.folded_bn is not None}
    with float_model or quantizers_disabled(model), \
            _reconstructed_bn(layers, apply=False) as stats:
        calib.run_all(model)
    out = {}
    for name, layer in layers.items():
        mean, var = stats[name].result()
        out[name] = (torch.sqrt(var + layer.folded_bn.eps), mean)  # type: ignore[union-attr]
    return out


@torch.no_grad()
def _refold_layer(layer: QuantModule, folded: FoldedBN, mean: torch.Tensor, var: torch.Tensor,
                  target: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    codes = layer.w_quant.int_repr(layer.weight)
    gamma_r, beta_r = target if target is not None else identity_bn(folded)[:2]
    w, b, s = refold(layer.weight, layer.ensure_bias(), layer.w_quant.scale, gamma_r, beta_r,
                     mean, var, folded.eps)
    layer.weight.copy_(w)
    layer.bias.copy_(b)  # type: ignore[union-attr]
    layer.w_quant.scale.copy_(s)
    # f W / (f s) can round differently from W / s by one ulp at a .5 boundary: pin such weights
    # to their grid point so the integer weights are unchanged exactly.
    moved = layer.w_quant.int_repr(layer.weight) != codes
    if moved.any():
        scale, zp = layer.w_quant.qparams()
        grid = (codes.float() - zp.reshape(-1, *([1] * (codes.dim() - 1)))) \
            * scale.reshape(-1, *([1] * (codes.dim() - 1)))
        layer.weight[moved] = grid[moved]


@torch.no_grad()
def tune_batchnorm(model: nn.Module, calib: CalibrationData,
                   targets: Targets | None = None) -> BNTuningHandle:
    """BN tuning of every quantized layer that has a folded BN; returns an undo handle.

    ``targets``: (gamma_r, beta_r) per layer (e.g. from :func:`float_moments`); default the
    paper's identity reconstruction from the folded BN."""
    layers = {n: m for n, m in quant_layers(model).items() if m.folded_bn is not None}
    handle = BNTuningHandle()
    if not layers:
        return handle
    with _reconstructed_bn(layers, targets) as stats:
        calib.run_all(model)
    for name, layer in layers.items():
        mean, var = stats[name].result()
        handle.saved[name] = [(t, t.detach().clone()) for t in _tensors(layer)]
        _refold_layer(layer, layer.folded_bn, mean, var,  # type: ignore[arg-type]
                      targets[name] if targets else None)
    return handle


@dataclass(frozen=True)
class BNTuningOptions:
    """target: "float" (the float model's statistics on the calibration data), "bn" (the folded
    BN's training statistics: the paper) or "best" (default: both are tried and the one with
    the lower calibration KL is kept). guard: undo if the calibration KL rises (with "best":
    keep neither if both raise it)."""

    target: str = "best"
    guard: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"bn_tuning target must be one of {', '.join(TARGETS)}, "
                             f"got {self.target!r}")


@register_step
class BNTuning(Step[BNTuningOptions]):
    """Re-estimates folded BN statistics on the quantized model; the undo handle is kept in
    ``ctx.cache.bn_tuning_undo``."""

    name = "bn_tuning"
    Options = BNTuningOptions
    effects = frozenset({"changes_weights"})

    def run(self, ctx: Context) -> dict[str, Any]:
        o: BNTuningOptions = self.options
        names = ("float", "bn") if o.target == "best" else (o.target,)
        measure = o.guard or len(names) > 1
        before = calibration_kl(ctx) if measure else None
        targets = {t: float_moments(ctx.qmodel, ctx.calib, ctx.as_float()) if t == "float"
                   else None for t in names}  # the float statistics are measured once
        tried: dict[str, float] = {}
        for t in names[:-1]:  # every target but the last is measured, then undone
            h = tune_batchnorm(ctx.qmodel, ctx.calib, targets[t])
            tried[t] = calibration_kl(ctx)
            h.undo()
        handle = tune_batchnorm(ctx.qmodel, ctx.calib, targets[names[-1]])
        if measure:
            tried[names[-1]] = calibration_kl(ctx)
        choice = min(tried, key=tried.__getitem__) if tried else names[-1]
        if choice != names[-1]:  # deterministic: its KL is the one measured above
            handle.undo()
            handle = tune_batchnorm(ctx.qmodel, ctx.calib, targets[choice])
        tuned = handle.layers
        after = tried.get(choice)
        kept = not o.guard or after is None or before is None or after <= before
        if not kept:
            log.info("BN tuning raised the calibration KL %.5f -> %.5f; undone", before, after)
            handle.undo()
        ctx.cache.bn_tuning_undo = handle
        for name in tuned:
            ctx.report.layer(name)["bn_tuned"] = kept
        return {"layers": len(tuned), "target": choice, "kl_before": before,
                "kl_after": after, "kl_by_target": tried if len(names) > 1 else {},
                "kept": kept}
