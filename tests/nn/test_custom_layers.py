"""Subclasses with their own forward, BN folding edge cases, dtypes and MAC coverage."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ptqkit import Recipe, quantize
from ptqkit.nn.modules import QuantCustomConv2d, quant_layers


class SamePadConv(nn.Conv2d):
    """TF-style 'same' padding done in forward, as Conv2dStaticSamePadding."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, k, stride, groups=groups, bias=False)
        p = max(k - stride, 0)
        self.static_padding = nn.ZeroPad2d((p // 2, p - p // 2, p // 2, p - p // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class WSConv(nn.Conv2d):
    """Weight standardisation: the op's weight is computed from the parameter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class SameNet(nn.Module):
    def __init__(self, bn: bool) -> None:
        super().__init__()
        self.c1, self.c2 = SamePadConv(3, 8, 3, 2), SamePadConv(8, 8, 3, groups=8)
        self.c3 = WSConv(8, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.c3(F.relu(self.c2(x))))
        return self.fc(x.mean((2, 3)))


def _net(bn: bool) -> nn.Module:
    torch.manual_seed(0)
    m = SameNet(bn).eval()
    if bn:
        m.b1.running_mean.uniform_(-0.5, 0.5)
        m.b1.running_var.uniform_(0.5, 2.0)
    return m


def test_custom_forward_convs_are_quantized_and_exact_at_16_bits() -> None:
    m, x = _net(bn=False), torch.randn(32, 3, 16, 16)
    q = quantize(m, x, Recipe(w_bits=16, a_bits=16))
    layers = quant_layers(q)
    assert list(layers) == ["c1", "c2", "c3", "fc"]
    assert all(isinstance(layers[n], QuantCustomConv2d) for n in ("c1", "c2", "c3"))
    with torch.no_grad():
        torch.testing.assert_close(q(x), m(x), rtol=0, atol=0)
    assert q.report.coverage["fraction"] == 0.0  # 16 bits: every layer runs float


def test_custom_forward_convs_at_w8a8_agree_with_float() -> None:
    m, x = _net(bn=True), torch.randn(64, 3, 16, 16)
    q = quantize(m, x, Recipe(w_bits=8, a_bits=8))
    assert q.ptq.folded == {"c1": "b1"} and q.report.coverage["fraction"] == 1.0
    with torch.no_grad():
        ref, out = m(x), q(x)
    assert (ref.argmax(1) == out.argmax(1)).float().mean() >= 0.95
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    # the WS conv's quantized weight is the standardised weight its op really used
    w = m.c3.weight
    ws = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
    torch.testing.assert_close(quant_layers(q)["c3"].weight, ws)


def test_bn_after_a_weight_transforming_forward_is_not_folded() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.bn = WSConv(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.c(x)).mean((2, 3))

    torch.manual_seed(0)
    m = Net().eval()
    m.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 3, 8, 8)
    with pytest.warns(UserWarning, match="bn left unfolded"):
        q = quantize(m, x, Recipe(w_bits=16, a_bits=16))
    assert q.ptq.folded == {} and "bn" in q.ptq.unfolded
    with torch.no_grad():
        torch.testing.assert_close(q(x), m(x))


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.bn(self.conv(x)) + F.relu(self.conv(x))).mean((2, 3))


def test_shared_conv_with_bn_after_one_use_is_left_unfolded() -> None:
    torch.manual_seed(0)
    m = SharedConv().eval()
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 4, 8, 8)
    with pytest.warns(UserWarning, match="runs 2 times"):
        q = quantize(m, x, Recipe(w_bits=16, a_bits=16))
    assert q.ptq.folded == {}
    with torch.no_grad():
        torch.testing.assert_close(q(x), m(x), rtol=0, atol=0)


def test_bn_without_running_stats_is_left_unfolded() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                      nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(8, 3, 8, 8)
    with pytest.warns(UserWarning, match="track_running_stats=False"):
        q = quantize(m, x, Recipe(w_bits=16, a_bits=16))
    assert q.ptq.folded == {}
    with torch.no_grad():
        torch.testing.assert_close(q(x), m(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_get_a_clear_error(dtype: torch.dtype) -> None:
    m = nn.Sequential(nn.Linear(4, 4)).to(dtype)
    with pytest.raises(ValueError, match=r"float32 models.*model\.float\(\)"):
        quantize(m, torch.randn(2, 4).to(dtype), Recipe(w_bits=8, a_bits=8))


def test_coverage_names_the_biggest_float_layer_and_warns() -> None:
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 16, 3), nn.Conv2d(16, 4, 3))
    x = torch.randn(4, 3, 16, 16)
    with pytest.warns(UserWarning, match="ConvTranspose2d is not supported"):
        q = quantize(m, x, Recipe(w_bits=8, a_bits=8))
    cov = q.report.coverage
    # conv0: 8*14*14 outputs x 27; convT: 8*14*14 inputs x 16*9; conv3: 4*14*14 outputs x 16*9
    quant = 4 * (8 * 14 * 14 * 27 + 4 * 14 * 14 * 144)
    total = quant + 4 * 8 * 14 * 14 * 144
    assert cov["quantized_macs"] == quant and cov["total_macs"] == total
    assert cov["float_layers"][0]["name"] == "2"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(nn.Sequential(nn.Conv2d(3, 4, 3)), x, Recipe(w_bits=8, a_bits=8))
