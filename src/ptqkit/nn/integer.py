"""Integer-exact inference: the arithmetic of ONNX Runtime's fused CPU kernels (MLAS), in torch.

At inference (no gradient) a quantized layer whose output is requantized by the integer graph
computes its output the way ONNX Runtime's QLinearConv does, instead of rounding a float32
convolution of dequantized codes. With x_q (N, C, ...) the input codes, w_q (O, C/g, ...) the
weight codes, z_x, z_w[o] their zero-points, s_x, s_w[o], s_y the scales and b[o] the float bias:

    acc[n, o, ...] = sum_k (x_q - z_x) * (w_q[o] - z_w[o])  +  b_q[o]   (exact; wraps as int32)
    b_q[o]         = round_half_even(b[o] / fl32(s_x * s_w[o]))         (the export's, saturated)
    M[o]           = fl32(fl32(s_x * s_w[o]) / s_y)                            (qlinearconv.cc)
    y_q            = clamp(round_half_even(fl32(fl32(acc) * M[o])) + z_y, qmin, qmax)
    y              = (y_q - z_y) * s_y                                         (float32)

which is MLAS ``MlasRequantizeOutput`` and the post-processing of the symmetric convolution
kernels (ConvSymKernelAvx512Core.S: vcvtdq2ps, vmulps, clamp, vcvtps2dq, add zero point).
The input codes are QuantizeLinear's: clamp(round_half_even(x / s_x) + z_x) - a division, as
``MlasQuantizeLinear`` does (on codes that are already on the grid this gives them back).

QLinearAdd (MLAS AVX2 kernel, qladd_avx2.cpp) on codes a_q, b_q of two tensors:

    r_a = fl32(s_a / s_c), r_b = fl32(s_b / s_c)
    f   = fl32(z_c - fma(r_a, z_a, fl32(r_b z_b)))
    c_q = clamp(round_half_even(fma(a_q, r_a, fma(b_q, r_b, f))), qmin, qmax)

(fma: one rounding; the contraction of r_a z_a + r_b z_b was identified against ONNX Runtime 1.32.)
The accumulation is exact: in float32 when every partial sum is below 2^24 in magnitude (bounded
by max|x_q - z_x| * max_o sum|w_q[o] - z_w[o]|), else in float64 (exact below 2^53).
:func:`float_simulation` switches the integer path off (the float simulation, e.g. to compare).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["integer_inference", "float_simulation", "quantize_codes", "centred_codes",
           "output_multiplier", "bias_codes", "float_bias_codes", "requantize",
           "integer_accumulate", "accumulation_bound", "wrap_int32", "qlinear_add", "EXACT_F32"]

EXACT_F32 = 2 ** 24  # float32 represents every integer of magnitude <= 2^24 exactly
_STATE = {"enabled": True}


def integer_inference() -> bool:
    """True when quantized layers use the integer-exact path at inference (the default; never
    while torch.jit / torch.onnx trace the model: the export writes the QDQ form)."""
    return (_STATE["enabled"] and not torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export())


@contextlib.contextmanager
def float_simulation() -> Iterator[None]:
    """Within this block quantized layers round float32 results as before (no integer path)."""
    old = _STATE["enabled"]
    _STATE["enabled"] = False
    try:
        yield
    finally:
        _STATE["enabled"] = old


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   qmin: float, qmax: float) -> torch.Tensor:
    """QuantizeLinear codes (float tensor of integers): clamp(round_half_even(x / s) + z, qmin, qmax).

    x: any shape; scale, zero_point: scalars (per tensor)."""
    s, z = scale.reshape(()).float(), float(zero_point.reshape(-1)[0])
    return torch.clamp(torch.round(x / s), qmin - z, qmax - z).add_(z)


def centred_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  qmin: float, qmax: float) -> torch.Tensor:
    """QuantizeLinear codes minus the zero-point: clamp(round_half_even(x / s), qmin - z, qmax - z)."""
    z = float(zero_point.reshape(-1)[0])
    return torch.div(x, scale.reshape(()).float()).round_().clamp_(qmin - z, qmax - z)


def output_multiplier(s_x: torch.Tensor, s_w: torch.Tensor, s_y: torch.Tensor) -> torch.Tensor:
    """M[o] = fl32(fl32(s_x * s_w[o]) / s_y), as ONNX Runtime's QLinearConv ComputeOutputScale.

    s_x, s_y: per-tensor scales; s_w: (O,). Returns (O,) float32."""
    return (s_x.float().reshape(()) * s_w.float().reshape(-1)) / s_y.float().reshape(())


def bias_codes(bias: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """The int32 bias the export writes: round_half_even(b / fl32(s_x s_w)) (float64, saturated).

    bias, s_w: (O,); s_x: per-tensor. Returns (O,) float64 integers."""
    scale = (s_x.float().reshape(()) * s_w.float().reshape(-1)).double()
    return torch.clamp(torch.round(bias.detach().double().reshape(-1) / scale),
                       -(2.0 ** 31), 2.0 ** 31 - 1)


def wrap_int32(acc: torch.Tensor) -> torch.Tensor:
    """acc (float64 integers) reduced to int32 two's complement, as the kernels' int32 adds wrap
    (e.g. a bias saturated to -2^31 plus a negative sum): acc - 2^32 floor((acc + 2^31) / 2^32)."""
    return acc - 4294967296.0 * torch.floor((acc + 2147483648.0) / 4294967296.0)


def float_bias_codes(bias: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """The int32 bias ONNX Runtime makes itself from a float bias left in the graph (a Conv whose
    input is a Pad, e.g. TF 'same' padding): round_half_even(fl32(b / fl32(s_x s_w))) in float32,
    an out-of-range value becoming -2^31 (x86 float -> int32 conversion). (O,) float64; equal to
    :func:`bias_codes` wherever |b / (s_x s_w)| < 2^24."""
    scale = s_x.float().reshape(()) * s_w.float().reshape(-1)
    k = torch.round(bias.detach().float().reshape(-1) / scale).double()
    return torch.where(k.abs() >= 2.0 ** 31, torch.full_like(k, -(2.0 ** 31)), k)


def requantize(acc: torch.Tensor, multiplier: torch.Tensor, zero_point: torch.Tensor,
               qmin: float, qmax: float, axis: int = 1) -> torch.Tensor:
    """MlasRequantizeOutput on the exact accumulator ``acc`` (bias included, integers in float64 or
    float32): clamp(round_half_even(fl32(fl32(acc) * M)), qmin - z, qmax - z) - the output codes
    minus the zero-point, as float32. multiplier: (O,) along ``axis`` of acc, or a scalar."""
    m = multiplier.float()
    if m.numel() > 1:
        shape = [1] * acc.dim()
        shape[axis] = -1
        m = m.reshape(shape)
    z = float(zero_point.reshape(-1)[0])
    return (acc.float() * m).clamp_(qmin - z, qmax - z).round_()


def integer_accumulate(op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       x_c: torch.Tensor, w_c: torch.Tensor) -> torch.Tensor:
    """op(x_c, w_c) for integer-valued x_c = x_q - z_x and w_c = w_q - z_w, computed exactly.

    op: a linear op (conv or linear, no bias). float32 when max|x_c| * max_o sum|w_c[o]| < 2^24
    (every partial sum then is an exactly represented integer), else float64. Returns the
    accumulator in the dtype used (float32 or float64)."""
    if accumulation_bound(x_c, w_c) < EXACT_F32:
        return op(x_c, w_c)
    return op(x_c.double(), w_c.double())


def accumulation_bound(x_c: torch.Tensor, w_c: torch.Tensor) -> float:
    """max|x_c| * max_o sum|w_c[o]|: no partial sum of op(x_c, w_c) exceeds it in magnitude."""
    if not x_c.numel():
        return 0.0
    lo, hi = torch.aminmax(x_c)
    per_out = w_c.abs().reshape(w_c.shape[0], -1).sum(1).max()
    return max(-float(lo), float(hi)) * float(per_out)


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fl32(a * b + c) with one rounding (a*b exact in float64 for float32 a, b)."""
    return (a.double() * b.double() + c.double()).float()


def qlinear_add(a_q: torch.Tensor, s_a: float, z_a: int, b_q: torch.Tensor, s_b: float, z_b: int,
                s_c: float, z_c: int, qmin: int, qmax: int) -> torch.Tensor:
    """MLAS QLinearAdd on codes a_q, b_q (same shape, float tensors of integers): the output codes
    c_q = clamp(round_half_even(fma(a_q, r_a, fma(b_q, r_b, f))), qmin, qmax) (see module doc)."""
    f32 = torch.float32
    sa, sb, sc = (torch.tensor(v, dtype=f32) for v in (s_a, s_b, s_c))
    r_a, r_b = sa / sc, sb / sc
    za, zb, zc = (torch.tensor(float(v), dtype=f32) for v in (z_a, z_b, z_c))
    fixed = zc - _fma32(r_a, za, r_b * zb)  # the compiler contracts r_a z_a + (r_b z_b) to an FMA
    v = _fma32(a_q, r_a, _fma32(b_q, r_b, fixed))
    return torch.clamp(torch.round(v), qmin, qmax)
