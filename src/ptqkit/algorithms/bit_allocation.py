"""Per-channel bit allocation for weights (Banner et al., section 4).

With a quota on the total number of quantization levels of a layer, minimising the rounding noise
sum_c alpha_c^2 / (3 L_c^2) gives levels L_c proportional to alpha_c^(2/3) (Lagrange multipliers on
sum_c L_c = C * 2^B). Bits are log2(L_c), made integer here.

Representation (exportable as ordinary per-channel quantization): the layer's weight quantizer
moves to the largest allocated bit width B_max (its ``spec.bits``); channel c gets the scale and
zero-point of its own b_c-bit grid and a per-channel code clamp ``Quantizer.channel_bits`` so its
integer weights only use the 2^b_c codes [0, 2^b_c - 1] (asymmetric) of the B_max-bit container.
An exporter writes ``w_quant.int_repr(weight)``, the per-channel scales and zero-points as usual;
packed storage may use b_c bits per channel. The compression ratio counts the mean channel bits.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from ..core.primitives import qparams_from_range
from ..core.spec import QuantSpec
from ..nn.modules import QuantModule
from ..ranges import get_range_method
from .base import Context, Step, register_step

__all__ = ["banner_levels", "allocate_bits", "BitAllocationOptions", "BitAllocation",
           "allocate_layer"]

log = logging.getLogger(__name__)


def banner_levels(alpha: torch.Tensor, budget: float) -> torch.Tensor:
    """Banner's optimal levels per channel: alpha (C,) -> L (C,) with sum L = C * 2^budget and
    L_c proportional to alpha_c^(2/3)."""
    w = alpha.double().clamp(min=0).pow(2.0 / 3.0)
    if float(w.sum()) == 0.0:
        w = torch.ones_like(w)
    return alpha.numel() * 2.0**budget * w / w.sum()


def _check_budget(budget: float, min_bits: int, max_bits: int) -> None:
    if not 2 <= min_bits <= max_bits <= 8:
        raise ValueError(f"need 2 <= min_bits <= max_bits <= 8, got {min_bits}, {max_bits}")
    if not budget >= min_bits:
        raise ValueError(f"a bit budget of {budget} bits per channel is below the minimum of "
                         f"{min_bits} bits per channel; use a budget >= {min_bits}")


def allocate_bits(alpha: torch.Tensor, budget: float, min_bits: int = 2,
                  max_bits: int = 8) -> torch.Tensor:
    """Integer bits per channel (C,) whose mean never exceeds ``budget``.

    alpha: (C,) clipping values (half the clipping range). Start from round(log2 L_c) of
    ``banner_levels`` clamped to [min_bits, max_bits]; while over the budget take one bit from the
    channel whose rounding noise alpha^2 4^-b grows least, then spend whole spare bits on the
    channels whose noise falls most.
    """
    _check_budget(budget, min_bits, max_bits)
    alpha = alpha.detach().double().reshape(-1)
    bits = torch.log2(banner_levels(alpha, budget)).round().clamp(min_bits, max_bits).long()
    total = int(alpha.numel() * budget + 1e-9)  # whole bits the layer may spend
    noise = alpha.pow(2)
    while int(bits.sum()) > total:  # removing a bit multiplies the noise by 4: cost 3 a^2 4^-b
        cost = torch.where(bits > min_bits, 3 * noise * 4.0 ** -bits.double(), torch.inf)
        bits[int(cost.argmin())] -= 1
    while int(bits.sum()) < total and bool((bits < max_bits).any()):
        gain = torch.where(bits < max_bits, 0.75 * noise * 4.0 ** -bits.double(), -torch.inf)
        bits[int(gain.argmax())] += 1
    return bits


@dataclass(frozen=True)
class BitAllocationOptions:
    """budget: mean bits per weight of every layer (None: the layer's own w_bits, so the model
    size is unchanged). range_method: how each channel's range is set at its new bit width
    (None: the recipe's w_range). Layers at max_bits or above are left alone."""

    budget: float | None = None
    min_bits: int = 2
    max_bits: int = 8
    range_method: str | None = None

    def __post_init__(self) -> None:
        _check_budget(self.budget if self.budget is not None else self.min_bits,
                      self.min_bits, self.max_bits)
        if self.range_method is not None:
            get_range_method(self.range_method)


@torch.no_grad()
def allocate_layer(layer: QuantModule, budget: float, method: str,
                   opts: BitAllocationOptions) -> torch.Tensor:
    """Allocate bits to the output channels of one layer and set its weight quantizer.

    alpha_c is half of channel c's current clipping range; each channel's range is then set
    again with ``method`` on its own b_c-bit grid. Returns the bits (C,).
    """
    wq = layer.w_quant
    lo, hi = wq.range()
    bits = allocate_bits((hi - lo) / 2, budget, opts.min_bits, opts.max_bits)
    w = layer.weight.detach().reshape(layer.out_channels, -1)
    wq.set_spec(wq.spec.with_bits(int(bits.max())))
    scale, zp = torch.empty(len(bits)), torch.empty(len(bits))
    fn = get_range_method(method)
    for b in bits.unique().tolist():
        rows = bits == b
        spec_b = QuantSpec(int(b), wq.spec.symmetric, "channel", 0)
        scale[rows], zp[rows] = qparams_from_range(*fn(w[rows], spec_b), spec_b)
    wq.set_qparams(scale, zp)
    wq.set_channel_bits(bits)
    return bits


@register_step
class BitAllocation(Step[BitAllocationOptions]):
    """Banner's per-channel bit allocation of every quantized layer's weights."""

    name = "bit_allocation"
    Options = BitAllocationOptions
    effects = frozenset({"tunes_ranges", "changes_bits"})

    def run(self, ctx: Context) -> dict[str, Any]:
        opts: BitAllocationOptions = self.options
        method = opts.range_method or (ctx.recipe.w_range if ctx.recipe else "mse")
        done = {}
        for name, layer in ctx.layers().items():
            budget = opts.budget if opts.budget is not None else float(layer.w_bits)
            if not layer.w_quant.active or budget >= opts.max_bits:
                continue
            bits = allocate_layer(layer, budget, method, opts)
            hist = dict(sorted(Counter(bits.tolist()).items()))
            ctx.report.layer(name).update(w_bits_mean=float(bits.float().mean()),
                                          w_channel_bits=hist)
            done[name] = float(bits.float().mean())
            log.debug("%s: channel bits %s (budget %.2f)", name, hist, budget)
        return {"layers": len(done), "range_method": method, "mean_bits": done}
