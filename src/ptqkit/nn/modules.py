"""Quantized layers and the registry float type -> quantized type.

A quantized layer holds its (BN-folded) float weight and bias, a per-output-channel weight
quantizer ``w_quant`` and a per-tensor input-activation quantizer ``a_quant``. Biases stay float
(32-bit in the integer runtime).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.quantizer import Quantizer
from ..core.spec import QuantSpec
from . import integer
from .custom import OP_FUNCS, OpOverride, OpRecord, has_own_forward, registered_base

__all__ = ["FoldedBN", "QuantModule", "QuantConv1d", "QuantConv2d", "QuantLinear", "QuantEmbedding",
           "QuantCustomConv1d", "QuantCustomConv2d", "QuantCustomLinear", "REGISTRY", "register",
           "quant_layers", "quant_class_for"]

REGISTRY: dict[type[nn.Module], type[QuantModule]] = {}


def register(float_type: type[nn.Module]):  # type: ignore[no-untyped-def]
    """Class decorator: ``float_type`` modules are swapped for the decorated quantized type."""

    def deco(cls: type[QuantModule]) -> type[QuantModule]:
        REGISTRY[float_type] = cls
        cls.float_type = float_type
        return cls

    return deco


@dataclass
class FoldedBN:
    """The BatchNorm that was folded into a layer (kept for batch-norm tuning, appendix B)."""

    gamma: torch.Tensor
    beta: torch.Tensor
    eps: float
    running_mean: torch.Tensor
    running_var: torch.Tensor


class QuantModule(nn.Module):
    """Base of quantized layers: y = op(a_quant(x), w_quant(weight)) + bias."""

    float_type: ClassVar[type[nn.Module]]
    channel_axis: ClassVar[int] = 1  # output channel axis of op's result

    def __init__(self, fl: nn.Module, w_spec: QuantSpec, a_spec: QuantSpec) -> None:
        super().__init__()
        weight = cast(torch.Tensor, fl.weight).detach().clone()
        self.weight = nn.Parameter(weight)
        bias = getattr(fl, "bias", None)
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.w_quant = Quantizer(QuantSpec(w_spec.bits, w_spec.symmetric, "channel", 0),
                                 weight.shape[0])
        self.a_quant = Quantizer(QuantSpec(a_spec.bits, a_spec.symmetric, "tensor"))
        self.folded_bn: FoldedBN | None = None
        # optional output quantizer (set by the "int_outputs" step for integer deployment)
        self.o_quant: Quantizer | None = None

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def w_bits(self) -> int:
        return self.w_quant.spec.bits

    @property
    def a_bits(self) -> int:
        return self.a_quant.spec.bits

    def macs_per_sample(self, out_shape: torch.Size) -> int:
        """Multiply-accumulates per sample given the layer's output shape (N, C, ...)."""
        per_output = self.weight[0].numel()
        return int(per_output * torch.Size(out_shape[1:]).numel())

    def op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def quant_weight(self) -> torch.Tensor:
        return self.w_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.o_quant is not None and not torch.is_grad_enabled() and integer.integer_inference():
            y = self.integer_forward(x)
            if y is not None:
                return y
        y = self.op(self.a_quant(x), self.w_quant(self.weight), self.bias)
        return y if self.o_quant is None else self.o_quant(y)

    def has_integer_op(self) -> bool:
        """True when ``integer_op`` is defined (the integer inference path)."""
        return False

    def integer_op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """op(x, w) without bias, on integer codes (the integer path; see ``has_integer_op``)."""
        raise NotImplementedError

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output as ONNX Runtime's QLinearConv computes it (``nn.integer``): exact integer
        accumulation of (x_q - z_x)(w_q - z_w) plus the int32 bias, requantized with the float32
        multiplier fl32(fl32(s_x s_w) / s_y), dequantized: (y_q - z_y) * s_y, shape of the float
        output. None when the layer, its quantizers or the input do not allow it (8-bit-or-less
        active input, weight and per-tensor output quantizers, a float32 input)."""
        a, w, o = self.a_quant, self.w_quant, self.o_quant
        if (o is None or not self.has_integer_op() or x.dtype != torch.float32
                or not (a.active and w.active and o.active)
                or max(a.spec.bits, w.spec.bits, o.spec.bits) > 8 or o.spec.per_channel):
            return None
        s_x, z_x = a.qparams()
        x_c = integer.centred_codes(x, s_x, z_x, *_code_range(a))
        s_w, z_w = w.qparams()
        w_c = w.int_repr(self.weight).float() - z_w.reshape(
            [-1] + [1] * (self.weight.dim() - 1))
        bound = integer.accumulation_bound(x_c, w_c)
        if bound < integer.EXACT_F32:
            acc = self.integer_op(x_c, w_c)  # exact: every partial sum is an integer below 2^24
        else:
            acc = self.integer_op(x_c.double(), w_c.double())
        axis = self.channel_axis % acc.dim()
        if self.bias is not None:
            shape = [1] * acc.dim()
            shape[axis] = -1
            codes = (integer.float_bias_codes if getattr(self, "_op_input_changed", False)
                     else integer.bias_codes)
            b = codes(self.bias, s_x, s_w)
            total = bound + float(b.abs().max())
            if total < integer.EXACT_F32 and acc.dtype == torch.float32:
                acc = acc.add_(b.float().reshape(shape).to(acc.device))  # exact in float32
            else:
                acc = acc.double() + b.reshape(shape).to(acc.device)
                if total >= 2.0 ** 31:
                    acc = integer.wrap_int32(acc)
        s_y, z_y = o.qparams()
        m = integer.output_multiplier(s_x, s_w, s_y)
        y_c = integer.requantize(acc, m, z_y, o.spec.qmin, o.spec.qmax, axis=axis)
        return y_c.mul_(s_y.reshape(()))

    def ensure_bias(self) -> nn.Parameter:
        """Create a zero bias if the layer has none (BN folding and bias correction need one)."""
        if self.bias is None:
            self.bias = nn.Parameter(torch.zeros(self.out_channels, dtype=self.weight.dtype))
        return self.bias


def _code_range(q: Quantizer) -> tuple[float, float]:
    """The (qmin, qmax) codes of a per-tensor quantizer."""
    return float(q.spec.qmin), float(q.spec.qmax)


class _QuantConvNd(QuantModule):
    _fn: ClassVar[Callable[..., torch.Tensor]]

    def __init__(self, fl: nn.Module, w_spec: QuantSpec, a_spec: QuantSpec) -> None:
        super().__init__(fl, w_spec, a_spec)
        if fl.padding_mode != "zeros" and not isinstance(self, _CustomForward):  # type: ignore[attr-defined]
            raise ValueError(f"padding_mode={fl.padding_mode!r} is not supported (zeros only)")
        self.stride = fl.stride
        self.padding = fl.padding
        self.dilation = fl.dilation
        self.groups = fl.groups
        self.in_channels = fl.in_channels
        self.kernel_size = fl.kernel_size

    def op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return type(self)._fn(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def has_integer_op(self) -> bool:
        return True

    def integer_op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return type(self)._fn(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}")


@register(nn.Conv1d)
class QuantConv1d(_QuantConvNd):
    _fn = staticmethod(F.conv1d)


@register(nn.Conv2d)
class QuantConv2d(_QuantConvNd):
    _fn = staticmethod(F.conv2d)


@register(nn.Linear)
class QuantLinear(QuantModule):
    def __init__(self, fl: nn.Module, w_spec: QuantSpec, a_spec: QuantSpec) -> None:
        super().__init__(fl, w_spec, a_spec)
        self.in_features = fl.in_features
        self.out_features = fl.out_features

    channel_axis = -1

    def has_integer_op(self) -> bool:
        return True

    def op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, w, b)

    def integer_op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(x, w)

    def macs_per_sample(self, out_shape: torch.Size) -> int:
        return int(self.weight.shape[1] * torch.Size(out_shape[1:]).numel())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class _InputRecorder(OpOverride):
    """OpOverride that also keeps the input tensor the op received (``seen``)."""

    seen: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in OP_FUNCS and not self.done:
            first = args[0] if args else (kwargs or {}).get("input")
            self.seen = first if isinstance(first, torch.Tensor) else None
        return super().__torch_function__(func, types, args, kwargs)


class _CustomForward(QuantModule):
    """A quantized layer that keeps a user subclass's own forward (see ``nn/custom.py``).

    y = inner.forward(x) with its conv/linear op rewritten to op(x', w, b); ``inner`` is the
    original module, whose ``weight`` / ``bias`` become non-persistent buffers (its forward may
    still read their shapes). ``record`` is what the probe pass saw the op receive: the weight
    and bias the op really used become this layer's float ``weight`` / ``bias``.
    """

    def has_integer_op(self) -> bool:
        """The user's forward returns the op's output (it may pad or reshape the input, e.g.
        TF-style 'same' padding, which zero-pads the centred codes as the kernel pads with z_x)."""
        return bool(self.output_is_op)

    def integer_op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The user's forward on codes; notes whether the op saw another tensor than ``x`` (a
        Pad in front of the exported Conv: the export leaves that bias float, see
        ``integer.float_bias_codes``)."""
        mode = _InputRecorder(w, None)
        with mode:
            y = self.inner(x)
        self._op_input_changed = mode.seen is not None and mode.seen is not x
        return y

    def __init__(self, fl: nn.Module, w_spec: QuantSpec, a_spec: QuantSpec, record: OpRecord) -> None:
        super().__init__(fl, w_spec, a_spec)
        assert record.weight is not None  # checked by record.problem() before construction
        with torch.no_grad():
            if not record.weight_is_param:  # e.g. weight standardisation: the op's real weight
                self.weight = nn.Parameter(record.weight.clone())
            if not record.bias_is_param:
                b = record.bias
                self.bias = nn.Parameter(b.clone()) if b is not None else None
        for pname in ("weight", "bias"):
            p = fl._parameters.get(pname)
            if p is not None:
                del fl._parameters[pname]
                fl.register_buffer(pname, p.detach(), persistent=False)
        self.inner = fl
        self.output_is_op = record.output_is_op

    def op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        with OpOverride(w, b):
            return self.inner(x)


class QuantCustomConv1d(_CustomForward, QuantConv1d):
    """QuantConv1d that runs a Conv1d subclass's own forward."""


class QuantCustomConv2d(_CustomForward, QuantConv2d):
    """QuantConv2d that runs a Conv2d subclass's own forward (e.g. TF-style 'same' padding)."""


class QuantCustomLinear(_CustomForward, QuantLinear):
    """QuantLinear that runs a Linear subclass's own forward."""


_CUSTOM: dict[type[nn.Module], type[QuantModule]] = {
    nn.Conv1d: QuantCustomConv1d, nn.Conv2d: QuantCustomConv2d, nn.Linear: QuantCustomLinear}


def quant_class_for(mod: nn.Module) -> tuple[type[QuantModule] | None, bool]:
    """(quantized class, needs the custom-forward path) for a float module.

    Exact registered types map to their quantized type. A subclass without a forward of its own
    maps to its registered base's type; one with its own forward, or a conv with a padding mode
    other than zeros, takes the custom-forward path that keeps its forward.
    """
    base = registered_base(type(mod), REGISTRY)
    if base is None:
        return None, False
    custom = has_own_forward(mod, base) or getattr(mod, "padding_mode", "zeros") != "zeros"
    if custom:
        return (_CUSTOM.get(base), True) if base in _CUSTOM else (None, False)
    return REGISTRY[base], False


class QuantEmbedding(nn.Module):
    """Weight-only quantized ``nn.Embedding``: each row (one token's vector) has its own scale and
    zero-point; the integer indices are never quantized.

    Deliberately not a QuantModule and not in REGISTRY: it has no input quantizer, so the methods
    that walk ``quant_layers`` (which assume y = op(Q(x), Q(W)) + b) never see it. Swapped in on
    request by ``nn.prepare.quantize_embeddings`` (the "embeddings" step), never by ``prepare``.
    weight: (num_embeddings, embedding_dim); input: int indices (...); output: (..., embedding_dim).
    """

    def __init__(self, fl: nn.Embedding, w_spec: QuantSpec) -> None:
        super().__init__()
        if fl.max_norm is not None or fl.sparse:
            raise ValueError(f"cannot quantize an Embedding with max_norm={fl.max_norm}, "
                             f"sparse={fl.sparse}; exclude it from the embeddings step")
        self.weight = nn.Parameter(fl.weight.detach().clone(), requires_grad=False)
        self.padding_idx = fl.padding_idx
        self.w_quant = Quantizer(QuantSpec(w_spec.bits, w_spec.symmetric, "channel", 0),
                                 fl.num_embeddings)

    @property
    def w_bits(self) -> int:
        return self.w_quant.spec.bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.w_quant(self.weight), self.padding_idx)

    def extra_repr(self) -> str:
        n, d = self.weight.shape
        return f"{n}, {d}, padding_idx={self.padding_idx}"


def quant_layers(model: nn.Module) -> dict[str, QuantModule]:
    """Quantized layers by module name, in execution order when it was recorded by prepare()."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, QuantModule)}
    order = getattr(getattr(model, "ptq", None), "layer_order", None)
    if order:
        return {n: found[n] for n in order if n in found}
    return found
