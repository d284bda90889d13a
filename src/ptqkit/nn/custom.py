"""Quantizing subclasses of Conv1d/Conv2d/Linear that have a forward of their own.

Users' models often subclass ``nn.Conv2d`` and override ``forward``: TensorFlow-style "same"
padding (``Conv2dStaticSamePadding`` of the EfficientNet packages and timm), weight
standardisation, a pad mode done by hand. ptqkit keeps that forward. The quantized layer holds the
original module as ``inner`` and runs ``inner.forward`` with the one convolution / linear call in
it rewritten: its weight and bias become ``w_quant(W)`` and ``b`` (``OpOverride``), while the
module's input is quantized by ``a_quant`` before the forward. So

    y = inner.forward(a_quant(x)),  where  F.conv2d(x', W_inner, b_inner, *rest)
                                    becomes F.conv2d(x', w_quant(W), b, *rest)

``W`` is the weight that the convolution really received, recorded by one float pass
(``probe_custom_layers``): ``inner.weight`` itself for a padding-only forward, the standardised
weight for weight standardisation. All PTQ weights are constants, so that materialised ``W`` is the
layer's float weight from then on. A forward that calls no or several conv/linear ops, or that
could not be observed, leaves the module float with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["OP_FUNCS", "OpRecord", "OpOverride", "probe_custom_layers", "registered_base",
           "has_own_forward"]

# the functional ops a conv/linear forward ends in, with their positional argument names
OP_FUNCS: dict[Callable[..., torch.Tensor], tuple[str, ...]] = {
    F.conv1d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    F.linear: ("input", "weight", "bias"),
}


def _bind(func: Callable[..., torch.Tensor], args: tuple, kwargs: dict | None) -> dict:
    names = OP_FUNCS[func]
    bound = dict(zip(names, args))
    bound.update(kwargs or {})
    bound.setdefault("bias", None)
    return bound


def registered_base(cls: type[nn.Module], registry: dict) -> type[nn.Module] | None:
    """The nearest class in ``cls``'s MRO that has a quantized counterpart in ``registry``."""
    return next((c for c in cls.__mro__ if c in registry), None)


def has_own_forward(mod: nn.Module, base: type[nn.Module]) -> bool:
    """True when ``type(mod)`` overrides ``base.forward`` (or ``_conv_forward``)."""
    cls = type(mod)
    return (cls.forward is not base.forward
            or getattr(cls, "_conv_forward", None) is not getattr(base, "_conv_forward", None))


@dataclass
class OpRecord:
    """What one custom module's forward did in the probe pass.

    weight / bias: the tensors the conv/linear op received (detached copies); ``*_is_param``:
    whether they were the module's own ``weight`` / ``bias`` parameters unchanged;
    ``output_is_op``: whether the module returned the op's output unchanged; ``calls``: number of
    conv/linear ops the forward ran; ``func``: the op.
    """

    calls: int = 0
    current: int = 0
    func: Callable[..., torch.Tensor] | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    weight_is_param: bool = False
    bias_is_param: bool = False
    output_is_op: bool = False
    _out: torch.Tensor | None = None

    @property
    def foldable(self) -> bool:
        """BatchNorm after the module folds into it only when the forward is
        pre-processing + op(x, module.weight, module.bias) and returns the op's output."""
        return self.calls == 1 and self.weight_is_param and self.bias_is_param and self.output_is_op

    def problem(self) -> str | None:
        """Why the module cannot be quantized, or None."""
        if self.calls == 0:
            return "its forward ran no conv/linear op during calibration"
        if self.calls > 1:
            return f"its forward ran {self.calls} conv/linear ops (one is supported)"
        return None


class _Probe(TorchFunctionMode):
    def __init__(self, records: dict[nn.Module, OpRecord]) -> None:
        super().__init__()
        self.records = records
        self.stack: list[nn.Module] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func in OP_FUNCS and self.stack:
            mod = self.stack[-1]
            rec = self.records[mod]
            bound = _bind(func, args, kwargs)
            rec.current += 1
            rec.calls = max(rec.calls, rec.current)
            rec.func = func
            rec.weight = bound["weight"].detach().clone()
            bias = bound["bias"]
            rec.bias = bias.detach().clone() if bias is not None else None
            rec.weight_is_param = bound["weight"] is getattr(mod, "weight", None)
            rec.bias_is_param = bias is getattr(mod, "bias", None)
            rec._out = out
        return out


@torch.no_grad()
def probe_custom_layers(model: nn.Module, names: list[str],
                        run: Callable[[nn.Module], object]) -> dict[str, OpRecord]:
    """Observe what the forward of each named module does in one float pass ``run(model)``."""
    mods = {n: model.get_submodule(n) for n in names}
    records = {m: OpRecord() for m in mods.values()}
    probe = _Probe(records)
    handles = []
    for mod in mods.values():
        handles.append(mod.register_forward_pre_hook(lambda m, a: _push(probe, m)))
        handles.append(mod.register_forward_hook(lambda m, a, out: _pop(probe, m, out)))
    try:
        with probe:
            run(model)
    finally:
        for h in handles:
            h.remove()
    return {n: records[m] for n, m in mods.items()}


def _push(probe: _Probe, mod: nn.Module) -> None:
    probe.stack.append(mod)
    probe.records[mod].current = 0


def _pop(probe: _Probe, mod: nn.Module, out: object) -> None:
    probe.stack.pop()
    rec = probe.records[mod]
    rec.output_is_op = rec._out is not None and out is rec._out
    rec._out = None


class OpOverride(TorchFunctionMode):
    """Within the block, the conv/linear op gets ``weight`` and ``bias`` instead of its own.

    Only the first op is rewritten (``probe_custom_layers`` admitted modules with one op)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias, self.done = weight, bias, False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in OP_FUNCS and not self.done:
            self.done = True
            bound = _bind(func, args, kwargs)
            bound["weight"], bound["bias"] = self.weight, self.bias
            names = OP_FUNCS[func]
            return func(*[bound[k] for k in names if k in bound])
        return func(*args, **(kwargs or {}))
