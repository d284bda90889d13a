from __future__ import annotations

import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.evaluate import compression_ratio, evaluate, top1
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
