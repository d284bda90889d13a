from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from ptqkit.core.primitives import fake_quantize, qparams_from_range, quantize_int, round_ste
from ptqkit.core.quantizer import Quantizer
from ptqkit.core.spec import QuantSpec


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_tensor_bit_exact_vs_torch(bits: int, symmetric: bool) -> None:
    x = torch.randn(4096) * 3
    spec = QuantSpec(bits, symmetric)
    scale, zp = qparams_from_range(x.min(), x.max() * 0.7, spec)
    ours = fake_quantize(x, scale, zp, spec)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), spec.qmin, spec.qmax)
    assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_per_channel_bit_exact_vs_torch(bits: int, symmetric: bool) -> None:
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1) * 4
    spec = QuantSpec(bits, symmetric, "channel", 0)
    flat = w.reshape(16, -1)
    scale, zp = qparams_from_range(flat.amin(1), flat.amax(1) * 0.8, spec)
    ours = fake_quantize(w, scale, zp, spec)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp.to(torch.int32), 0, spec.qmin,
                                                 spec.qmax)
    assert_close(ours, ref, rtol=0, atol=0)


def test_round_ste_passes_gradient() -> None:
    x = torch.tensor([0.4, 1.5, 2.5, -0.6], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -1.0]  # half to even
    y.sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_qparams_represent_zero_exactly_and_cover_range() -> None:
    spec = QuantSpec(4)
    scale, zp = qparams_from_range(torch.tensor(-1.3), torch.tensor(2.9), spec)
    assert float(zp) == round(float(zp))
    assert float(fake_quantize(torch.zeros(1), scale, zp, spec)) == 0.0
    assert float(scale) == pytest.approx(4.2 / 15)
    # positive-only range is widened to include 0
    scale, zp = qparams_from_range(torch.tensor(0.5), torch.tensor(3.0), spec)
    assert float(zp) == 0.0 and float(scale) == pytest.approx(3.0 / 15)


def test_quantize_int_codes_in_grid() -> None:
    spec = QuantSpec(3)
    x = torch.linspace(-5, 5, 101)
    scale, zp = qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), spec)
    q = quantize_int(x, scale, zp, spec)
    assert q.min() == 0 and q.max() == 7 and torch.all(q == q.round())


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(1)
    with pytest.raises(ValueError, match="granularity"):
        QuantSpec(4, granularity="row")  # type: ignore[arg-type]
    assert QuantSpec(4, True).qmin == -8 and QuantSpec(4).qmax == 15


def test_quantizer_identity_until_initialized_and_when_disabled() -> None:
    q = Quantizer(QuantSpec(2))
    x = torch.randn(100)
    assert torch.equal(q(x), x)
    q.set_range(x.min(), x.max())
    assert len(torch.unique(q(x))) <= 4
    q.enabled = False
    assert torch.equal(q(x), x)


def test_quantizer_learnable_parameters_get_gradients() -> None:
    q = Quantizer(QuantSpec(4, granularity="channel"), channels=3)
    w = torch.randn(3, 10)
    q.set_range(w.amin(1) * 0.5, w.amax(1) * 0.5)
    (q(w) - w).pow(2).sum().backward()
    assert q.scale.grad is not None and torch.any(q.scale.grad != 0)
    assert q.zero_point.grad is not None


def test_quantizer_int_repr_and_range() -> None:
    q = Quantizer(QuantSpec(8))
    q.set_range(torch.tensor(-1.0), torch.tensor(3.0))
    lo, hi = q.range()
    assert float(lo) <= -1.0 + 1e-6 and float(hi) >= 3.0 - 0.02
    codes = q.int_repr(torch.tensor([-1.0, 0.0, 3.0]))
    assert codes.dtype == torch.int32 and codes.tolist()[0] == 0 and codes.tolist()[2] == 255


@pytest.mark.parametrize("bits, symmetric, per_channel",
                         [(8, False, False), (4, True, True), (2, False, True)])
def test_fused_inference_path_is_bit_identical_to_differentiable(bits, symmetric, per_channel) -> None:
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(6, 5, 7, 3, generator=g) * 3
    spec = QuantSpec(bits, symmetric, "channel" if per_channel else "tensor", 0)
    c = 6 if per_channel else 1
    scale = torch.rand(c, generator=g) * 0.5 + 0.01
    zp = torch.zeros(c) if symmetric else torch.randint(spec.qmin, spec.qmax + 1, (c,), generator=g).float()
    with torch.no_grad():
        fused = fake_quantize(x, scale, zp, spec)
    slow = fake_quantize(x.clone().requires_grad_(True), scale, zp, spec).detach()
    torch.testing.assert_close(fused, slow, rtol=0, atol=0)


def test_inference_path_with_code_bounds_matches_and_leaves_input_alone() -> None:
    """Per-channel code bounds (fewer levels on some channels) and exact .5 ties: the in-place
    inference path equals the differentiable one bit for bit and does not write into x."""
    g = torch.Generator().manual_seed(0)
    spec = QuantSpec(4, False, "channel", 1)
    scale = torch.tensor([0.5, 0.25, 0.1])
    x = torch.randn(8, 3, 5, generator=g) * 2
    x[0, :, 0] = torch.tensor([0.75, 0.125, 0.05])  # x / scale = 1.5, 0.5, 0.5: ties to even
    zp = torch.tensor([3.0, 8.0, 0.0])
    bounds = (torch.tensor([0.0, 4.0, 0.0]), torch.tensor([15.0, 11.0, 7.0]))
    before = x.clone()
    with torch.no_grad():
        fast = fake_quantize(x, scale, zp, spec, bounds)
    slow = fake_quantize(x.clone().requires_grad_(True), scale, zp, spec, bounds).detach()
    assert torch.equal(fast, slow) and torch.equal(x, before)
    codes = quantize_int(x, scale, zp, spec, bounds)
    assert torch.equal(fast, (codes - zp.reshape(1, 3, 1)) * scale.reshape(1, 3, 1))
