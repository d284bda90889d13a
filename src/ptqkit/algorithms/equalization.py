"""Step "equalize": cross-layer equalization and bias absorption (Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction", ICCV 2019, sections 4.1-4.2).

Pairs. Two quantized layers L1 -> act -> L2, where L1's output feeds only ``act`` and ``act``'s
output only L2's input; ``act`` is nothing, ReLU, LeakyReLU or (see below) ReLU6. L1 is a conv or
linear layer, L2 a conv with one group, a depthwise conv (groups = channels) or a linear layer.

Equalization. For channel i of the tensor between them, scale L1's output channel i (weights
and bias) by 1/s_i and L2's input channel i by s_i. Positive scales commute with the activation
(relu(y / s) = relu(y) / s), so the float function is unchanged. Criterion "weights" (the paper,
eq. 10): s_i = sqrt(r1_i / r2_i), with r1_i = max |W1[i, ...]| and r2_i = max |W2[:, i, ...]|,
which makes both ranges sqrt(r1_i r2_i). Criterion "activations": r1_i is replaced by the
calibration-set max |x_i| of the tensor between the layers, which balances the per-tensor
activation range of L2's input against L2's input-channel weight ranges (per-channel weight
quantization already absorbs L1's output-channel ranges). Chains of pairs are swept
``iters`` times (each sweep moves every pair to its balance given the others).

ReLU6 does not commute with scaling (min(y/s, 6) != min(y, 6)/s). ``relu6="relu"`` replaces
the ReLU6 module between two equalized layers by ReLU, as the paper does, which changes the float
function where y > 6; ``relu6="skip"`` leaves such pairs alone. A ReLU6 module called at several
places is replaced only when every call lies between equalized layers.

Bias absorption (section 4.2, ReLU-like activations only): with L1's folded BatchNorm giving the
pre-activation statistics N(beta_i, gamma_i^2), c_i = max(0, beta_i - 3 |gamma_i|) is (almost
surely) below every value of channel i, so relu(y_i - c_i) = relu(y_i) - c_i: subtract c from
L1's bias and add W2 c (summed over the kernel) to L2's bias. Skipped where L2 pads its input
(the padded zeros would not move with the shift).

The step runs after the range initialisation: it equalizes the float weights, makes the
equalized model the float reference of later steps, and sets every range again with the
recipe's range methods. With ``guard`` it keeps the result only when the calibration loss of the
quantized model against the original float outputs drops; otherwise everything is restored.
Models that torch.fx cannot trace are left unchanged (logged).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..calib.data import batch_size_of
from ..calib.engine import LeafTracer
from ..nn.control import float_weights, quantizers_disabled
from ..nn.modules import QuantConv1d, QuantConv2d, QuantLinear, QuantModule
from ..nn.prepare import set_module
from .base import Context, Step, calibration_kl, register_step
from .range_init import RangeInit, RangeOptions

__all__ = ["EqualizeOptions", "Equalize", "Pair", "find_pairs", "equalize_pairs",
           "absorb_biases"]

log = logging.getLogger(__name__)
_EXACT = (nn.ReLU, nn.LeakyReLU, nn.Identity)
_CRITERIA = ("weights", "activations")
_RELU6 = ("relu", "skip")


@dataclass(frozen=True)
class EqualizeOptions:
    """criterion: "weights" (Nagel et al.) or "activations" (see the module docstring);
    iters: sweeps over the pairs; relu6: "relu" or "skip"; absorb_bias: bias absorption;
    guard: keep the result only when the calibration loss drops; max_samples: calibration
    samples for the activation ranges."""

    criterion: str = "weights"
    iters: int = 10
    relu6: str = "relu"
    absorb_bias: bool = True
    guard: bool = True
    max_samples: int = 256

    def __post_init__(self) -> None:
        if self.criterion not in _CRITERIA:
            raise ValueError(f"equalize criterion must be one of {_CRITERIA}, got {self.criterion!r}")
        if self.relu6 not in _RELU6:
            raise ValueError(f"equalize relu6 must be one of {_RELU6}, got {self.relu6!r}")
        if self.iters < 1 or self.max_samples < 1:
            raise ValueError(f"equalize iters and max_samples must be >= 1, got {self.iters} and "
                             f"{self.max_samples}")


@dataclass
class Pair:
    """L1 -> act -> L2 by module name; ``act`` is the activation module's name (None: none) and
    ``relu6`` whether it is a ReLU6."""

    first: str
    second: str
    act: str | None
    relu6: bool


def _in_axis(layer: QuantModule) -> int | None:
    """Weight axis of L2's input channels: 1 (one group or linear), 0 (depthwise), None (other)."""
    if isinstance(layer, QuantLinear):
        return 1
    if isinstance(layer, (QuantConv1d, QuantConv2d)):
        if layer.groups == 1:
            return 1
        if layer.groups == layer.in_channels == layer.out_channels:
            return 0
    return None


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def find_pairs(model: nn.Module, relu6: str = "relu") -> list[Pair]:
    """Every equalizable pair of ``model``'s quantized layers, in graph order (empty when the
    model cannot be traced)."""
    try:
        graph = LeafTracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: no pairs
        log.info("equalize: torch.fx cannot trace the model (%s); nothing equalized",
                 str(exc).splitlines()[0][:200])
        return []
    mods = dict(model.named_modules())
    pairs: list[Pair] = []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    for node in graph.nodes:
        first = mods.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(first, (QuantConv1d, QuantConv2d, QuantLinear)):
            continue
        nxt, act, prev = _single_user(node), None, node
        while nxt is not None and nxt.op == "call_module" and \
                isinstance(mods.get(str(nxt.target)), (*_EXACT, nn.ReLU6)):
            if not isinstance(mods[str(nxt.target)], nn.Identity):  # e.g. a folded BatchNorm
                if act is not None:
                    break  # two activations in a row: not a pair
                act = nxt
            prev, nxt = nxt, _single_user(nxt)
        second = mods.get(str(nxt.target)) if nxt is not None and nxt.op == "call_module" else None
        if not isinstance(second, QuantModule) or nxt is None or nxt.args[:1] != (prev,):
            continue
        axis = _in_axis(second)
        if axis is None or second.weight.shape[axis] != first.out_channels:
            continue
        is6 = act is not None and isinstance(mods[str(act.target)], nn.ReLU6)
        if is6 and relu6 == "skip":
            continue
        pairs.append(Pair(str(node.target), str(nxt.target),
                          None if act is None else str(act.target), is6))
    if relu6 == "relu":  # a shared ReLU6 is replaced only if every call sits inside a pair
        inside: dict[str, int] = {}
        for p in pairs:
            if p.relu6 and p.act is not None:
                inside[p.act] = inside.get(p.act, 0) + 1
        pairs = [p for p in pairs if not p.relu6 or inside[str(p.act)] == calls[str(p.act)]]
    return pairs


def _r1(layer: QuantModule) -> torch.Tensor:
    return layer.weight.detach().reshape(layer.out_channels, -1).abs().amax(dim=1)


def _r2(layer: QuantModule) -> torch.Tensor:
    axis = _in_axis(layer)
    w = layer.weight.detach().movedim(int(axis or 0), 0)
    return w.reshape(w.shape[0], -1).abs().amax(dim=1)


@torch.no_grad()
def _scale(first: QuantModule, second: QuantModule, s: torch.Tensor) -> None:
    """L1's output channels / s, L2's input channels * s (s: (C,) > 0)."""
    view = (-1,) + (1,) * (first.weight.dim() - 1)
    first.weight.div_(s.reshape(view))
    if first.bias is not None:
        first.bias.div_(s)
    if first.folded_bn is not None:  # the folded BN describes the scaled channel now
        first.folded_bn.gamma = first.folded_bn.gamma / s
        first.folded_bn.beta = first.folded_bn.beta / s
    axis = int(_in_axis(second) or 0)
    shape = [1] * second.weight.dim()
    shape[axis] = -1
    second.weight.mul_(s.reshape(shape))


@torch.no_grad()
def _input_ranges(ctx: Context, names: list[str], max_samples: int) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of each named layer's input on up to ``max_samples`` calibration
    samples of the float model (channel axis 1, or the last axis of linear inputs)."""
    layers = ctx.layers()
    out: dict[str, torch.Tensor] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def f(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            x = x.movedim(-1 if isinstance(mod, QuantLinear) else 1, 0).reshape(x.shape[
                -1 if isinstance(mod, QuantLinear) else 1], -1)
            m = x.abs().amax(dim=1)
            out[name] = m if name not in out else torch.maximum(out[name], m)
        return f

    handles = [layers[n].register_forward_pre_hook(hook(n)) for n in names]
    seen = 0
    try:
        with ctx.as_float():
            for b in ctx.calib:
                ctx.calib.forward(ctx.qmodel, b)
                seen += batch_size_of(b)
                if seen >= max_samples:
                    break
    finally:
        for h in handles:
            h.remove()
    return out


def equalize_pairs(ctx: Context, pairs: list[Pair], opts: EqualizeOptions) -> None:
    """Rescale every pair, ``opts.iters`` sweeps (float weights; quantizers are not touched)."""
    layers = ctx.layers()
    # activation ranges are measured once: channel i of L2's input then scales exactly by 1/s_i
    act = (_input_ranges(ctx, [p.second for p in pairs], opts.max_samples)
           if opts.criterion == "activations" else {})
    for _ in range(opts.iters):
        for p in pairs:
            first, second = layers[p.first], layers[p.second]
            r1 = act[p.second] if opts.criterion == "activations" else _r1(first)
            r2 = _r2(second)
            ok = (r1 > 1e-8) & (r2 > 1e-8)
            s = torch.where(ok, (r1.clamp(min=1e-12) / r2.clamp(min=1e-12)).sqrt(),
                            torch.ones_like(r1))
            _scale(first, second, s.to(first.weight.dtype))
            if p.second in act:
                act[p.second] = act[p.second] / s


def _pads(layer: QuantModule) -> bool:
    if isinstance(layer, QuantLinear):
        return False
    k = getattr(layer, "kernel_size", (1,))
    return any(int(v) > 1 for v in k) or any(int(v) > 0 for v in getattr(layer, "padding", (0,))
                                             if not isinstance(v, str))


@torch.no_grad()
def absorb_biases(ctx: Context, pairs: list[Pair]) -> int:
    """Bias absorption across ReLU-like pairs (not ReLU6, not padding L2); returns the number of
    pairs whose bias moved."""
    layers, moved = ctx.layers(), 0
    for p in pairs:
        first, second = layers[p.first], layers[p.second]
        act = None if p.act is None else ctx.qmodel.get_submodule(p.act)
        if p.relu6 or not isinstance(act, nn.ReLU) or first.folded_bn is None or \
                first.bias is None or _pads(second):
            continue
        c = (first.folded_bn.beta - 3 * first.folded_bn.gamma.abs()).clamp(min=0)
        if not bool((c > 0).any()):
            continue
        first.bias.sub_(c)
        second.ensure_bias()
        axis = int(_in_axis(second) or 0)
        w = second.weight.detach()
        k = w.reshape(w.shape[0], w.shape[1], -1).sum(dim=2)  # (out, in) summed over the kernel
        shift = k[:, 0] * c if axis == 0 else k @ c  # depthwise: one input channel per output
        assert second.bias is not None
        second.bias.add_(shift.reshape(-1))
        moved += 1
    return moved


@register_step
class Equalize(Step[EqualizeOptions]):
    """Cross-layer equalization and bias absorption, then the ranges again (module docstring)."""

    name = "equalize"
    Options = EqualizeOptions
    effects = frozenset({"changes_weights", "initialises_ranges", "rescales_channels"})

    def run(self, ctx: Context) -> dict[str, Any]:
        opts = self.options
        pairs = find_pairs(ctx.qmodel, opts.relu6)
        if not pairs:
            return {"pairs": 0, "relu6_replaced": 0, "biases_absorbed": 0, "kept": False}
        ctx.float_outputs()  # the original float model stays the reference of every guard
        before = calibration_kl(ctx) if opts.guard else None
        saved = copy.deepcopy(ctx.qmodel.state_dict())
        saved_bn = {n: copy.copy(m.folded_bn) for n, m in ctx.layers().items()}
        saved_float = ctx.cache.float_weights
        replaced: dict[str, nn.Module] = {}
        for p in pairs:
            if p.relu6 and p.act is not None and p.act not in replaced:
                replaced[p.act] = ctx.qmodel.get_submodule(p.act)
                set_module(ctx.qmodel, p.act, nn.ReLU())
        with quantizers_disabled(ctx.qmodel):
            equalize_pairs(ctx, pairs, opts)
            moved = absorb_biases(ctx, pairs) if opts.absorb_bias else 0
        ctx.cache.float_weights = float_weights(ctx.qmodel)
        ranges = ctx.recipe.range_options() if ctx.recipe is not None else RangeOptions()
        RangeInit(ranges).run(ctx)
        after = calibration_kl(ctx) if opts.guard else None
        kept = before is None or after is None or after < before
        if not kept:
            for name, mod in replaced.items():
                set_module(ctx.qmodel, name, mod)
            ctx.qmodel.load_state_dict(saved)
            for n, m in ctx.layers().items():
                m.folded_bn = saved_bn[n]
            ctx.cache.float_weights = saved_float
        log.info("equalize: %d pairs, %d ReLU6 replaced, %d biases absorbed; calibration loss "
                 "%s -> %s (%s)", len(pairs), len(replaced), moved, before, after,
                 "kept" if kept else "undone")
        return {"pairs": len(pairs), "relu6_replaced": len(replaced), "biases_absorbed": moved,
                "kept": kept, "calib_loss_before": before, "calib_loss_after": after}
