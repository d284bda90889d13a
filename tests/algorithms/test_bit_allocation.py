from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import ptqkit
from ptqkit.algorithms.bit_allocation import BitAllocationOptions, allocate_bits, banner_levels
from ptqkit.core.quantizer import Quantizer
from ptqkit.core.spec import QuantSpec
from ptqkit.evaluate import compression_ratio
from ptqkit.nn.modules import quant_layers
from ptqkit.pipeline import Recipe


def test_banner_levels_follow_alpha_two_thirds() -> None:
    levels = banner_levels(torch.tensor([1.0, 8.0]), budget=4)
    # alpha^(2/3) = [1, 4]; quota 2 * 16 = 32 levels -> [6.4, 25.6]
    assert_close(levels, torch.tensor([6.4, 25.6], dtype=torch.float64))


def test_hand_checked_allocation() -> None:
    # log2([6.4, 25.6]) = [2.68, 4.68] -> [3, 5], mean 4 = budget
    assert allocate_bits(torch.tensor([1.0, 8.0]), 4).tolist() == [3, 5]
    assert allocate_bits(torch.ones(5), 3).tolist() == [3] * 5
    # a tiny channel is held at min_bits, the spare bits go to the others
    assert allocate_bits(torch.tensor([1e-6, 1.0, 1.0]), 4).tolist() == [2, 5, 5]
    assert allocate_bits(torch.rand(7), 8).tolist() == [8] * 7


@pytest.mark.parametrize("budget", [2, 2.5, 3, 4, 5.3, 7])
def test_mean_never_above_budget_and_bits_in_range(budget: float) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        alpha = torch.rand(37, generator=g).pow(4) * 10
        bits = allocate_bits(alpha, budget)
        assert bits.float().mean() <= budget + 1e-9
        assert int(bits.sum()) == int(37 * budget)  # the whole budget is spent
        assert bits.min() >= 2 and bits.max() <= 8


def test_allocation_lowers_rounding_noise_of_unequal_channels() -> None:
    alpha = torch.tensor([0.01, 0.1, 1.0, 10.0])
    bits = allocate_bits(alpha, 4)
    noise = lambda b: float((alpha.double() ** 2 * 4.0 ** -b.double()).sum())  # noqa: E731
    assert noise(bits) < 0.1 * noise(torch.full((4,), 4))


def test_budget_below_two_bits_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="below the minimum of 2 bits per channel"):
        allocate_bits(torch.ones(3), 1.5)
    with pytest.raises(ValueError, match="below the minimum of 2 bits per channel"):
        BitAllocationOptions(budget=1.0)
    with pytest.raises(ValueError, match="unknown range method"):
        BitAllocationOptions(range_method="nope")


@pytest.mark.parametrize("symmetric", [False, True])
def test_channel_bits_are_exactly_each_channels_own_grid(symmetric: bool) -> None:
    """The B_max-bit quantizer with channel_bits equals torch's per-channel fake quantization of
    every channel on its own b_c-bit grid, bit for bit; int_repr stays inside the channel codes."""
    w = torch.randn(4, 50) * torch.tensor([[0.1], [1.0], [3.0], [0.5]])
    bits = torch.tensor([2, 6, 3, 4])
    q = Quantizer(QuantSpec(6, symmetric, "channel"), 4)
    scale = (w.amax(1) - w.amin(1)) / (2.0 ** bits - 1) * 0.7
    zp = torch.zeros(4) if symmetric else torch.round(-w.amin(1) / scale).clamp(max=2.0 ** bits - 1)
    q.set_qparams(scale, zp)
    q.set_channel_bits(bits)
    out, codes = q(w), q.int_repr(w)
    for c, b in enumerate(bits.tolist()):
        lo, hi = (-(2 ** (b - 1)), 2 ** (b - 1) - 1) if symmetric else (0, 2**b - 1)
        ref = torch.fake_quantize_per_tensor_affine(w[c], float(scale[c]), int(zp[c]), lo, hi)
        assert_close(out[c], ref, rtol=0, atol=0)
        assert codes[c].min() >= lo and codes[c].max() <= hi and codes[c].max() > codes[c].min()
    assert_close((codes - zp[:, None]) * scale[:, None], out, rtol=0, atol=0)  # exportable form
    assert q.storage_bits == pytest.approx(3.75)


def test_channel_bits_validation_reset_and_state_dict_roundtrip() -> None:
    q = Quantizer(QuantSpec(4, granularity="channel"), 3)
    with pytest.raises(ValueError, match="2..4"):
        q.set_channel_bits(torch.tensor([2, 5, 3]))
    with pytest.raises(ValueError, match="3 channels"):
        q.set_channel_bits(torch.tensor([2, 3]))
    q.set_qparams(torch.ones(3), torch.zeros(3))
    q.set_channel_bits(torch.tensor([2, 4, 3]))
    fresh = Quantizer(QuantSpec(4, granularity="channel"), 3)
    fresh.load_state_dict(q.state_dict())
    assert fresh.channel_bits.tolist() == [2, 4, 3]
    plain = Quantizer(QuantSpec(4, granularity="channel"), 3)
    q.load_state_dict(plain.state_dict())  # a checkpoint without channel bits: uniform grid
    assert q.channel_bits is None
    q.set_channel_bits(torch.tensor([2, 4, 3]))
    q.set_spec(QuantSpec(8, granularity="channel"))
    assert q.channel_bits is None and q.storage_bits == 8.0


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)
        with torch.no_grad():  # very unequal output channels: allocation has something to do
            self.a.weight.mul_(torch.logspace(-2, 1, 32)[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@torch.no_grad()
def test_step_keeps_model_size_and_reduces_weight_error() -> None:
    net, x = _Net().eval(), torch.randn(256, 16)
    base = Recipe(w_bits=4, a_bits=8, first_last_8bit=False, w_range="aciq", a_range="minmax")
    plain = ptqkit.quantize(net, x, base)
    alloc = ptqkit.quantize(net, x, base.with_steps("bit_allocation"))
    la, lp = quant_layers(alloc)["a"], quant_layers(plain)["a"]
    assert la.w_quant.channel_bits is not None and la.w_quant.storage_bits <= 4.0
    assert la.w_bits == int(la.w_quant.channel_bits.max()) > 4
    assert compression_ratio(alloc) <= compression_ratio(plain) + 1e-12
    err = lambda m: float((m.w_quant(m.weight) - m.weight).pow(2).sum())  # noqa: E731
    assert err(la) < 0.5 * err(lp)
    assert alloc.report.layers["a"]["w_bits_mean"] <= 4.0
    assert [s["step"] for s in alloc.report.steps][:2] == ["ranges", "bit_allocation"]
