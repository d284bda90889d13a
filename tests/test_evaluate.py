from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.calib.data import CalibrationData
from ptqkit.evaluate import compression_ratio, evaluate, float_layer_outputs, layer_sqnr, top1
from ptqkit.pipeline import Recipe


def test_compression_ratio_hand_checked() -> None:
    model = nn.Sequential(nn.Linear(10, 10, bias=False), nn.ReLU(), nn.Linear(10, 10, bias=False))
    x = torch.randn(8, 10)
    q = ptqkit.quantize(model, x, Recipe(w_bits=4, a_bits=8, first_last_8bit=False))
    assert compression_ratio(q) == pytest.approx(4 / 32)
    q = ptqkit.quantize(model, x, Recipe(w_bits=4, a_bits=8, first_last_8bit=False,
                                         exclude=("2",)))
    assert compression_ratio(q) == pytest.approx((100 * 4 + 100 * 32) / (200 * 32))


def test_evaluate_identical_models() -> None:
    model = nn.Linear(4, 3)
    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    res = evaluate(model, model, x, y)
    assert res["agreement"] == 100.0 and res["kl"] == pytest.approx(0.0, abs=1e-6)
    assert res["top1"] == res["fp32_top1"] == top1(model(x), y)


def test_layer_sqnr_keeps_the_original_float_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(32, 6)
    q = ptqkit.quantize(model, x, Recipe(w_bits=4, a_bits=8, first_last_8bit=False))
    calib = CalibrationData(x)
    ref = float_layer_outputs(q, calib)
    assert torch.allclose(ref["0"], model[0](x), atol=1e-6)
    before = layer_sqnr(q, calib, reference=ref)
    assert before == pytest.approx(layer_sqnr(q, calib))  # nothing adapted yet: same reference
    with torch.no_grad():  # an "adaptation" that moves the float weight to its quantized value
        q[0].weight.copy_(q[0].w_quant(q[0].weight))
    # against the adapted weight layer 0 looks nearly error-free; against the original it does not
    assert layer_sqnr(q, calib)["0"] > before["0"] + 10
    assert layer_sqnr(q, calib, reference=ref)["0"] == pytest.approx(before["0"], abs=1e-3)
    out = q[0](x)
    expected = 10 * torch.log10(ref["0"].pow(2).sum() / (ref["0"] - out).pow(2).sum())
    assert layer_sqnr(q, calib, reference=ref)["0"] == pytest.approx(expected.item(), abs=1e-3)
