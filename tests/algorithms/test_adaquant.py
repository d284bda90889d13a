from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptqkit.algorithms import adaquant as aq
from ptqkit.algorithms.adaquant import AdaQuantOptions, adaquant_layer, collect_layer_io, layer_mse
from ptqkit.calib.cache import ActivationCache
from ptqkit.calib.data import CalibrationData
from ptqkit.core.spec import QuantSpec
from ptqkit.nn.control import quantizers_disabled
from ptqkit.nn.modules import QuantLinear
from ptqkit.pipeline import Recipe, StepSpec, quantize


def _layer(bits: int = 4) -> tuple[QuantLinear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    fl = nn.Linear(16, 8)
    with torch.no_grad():
        fl.weight.copy_(torch.randn(8, 16, generator=g) * 0.3)
    layer = QuantLinear(fl, QuantSpec(bits), QuantSpec(bits))
    x = torch.relu(torch.randn(200, 16, generator=g))
    with torch.no_grad():
        w = layer.weight.reshape(8, -1)
        layer.w_quant.set_range(w.min(1).values, w.max(1).values)
        layer.a_quant.set_range(x.min(), x.max())
        y = layer.op(x, layer.weight, layer.bias)
    return layer, x, y


def test_adaquant_layer_improves_and_writes_best_iterate() -> None:
    layer, x, y = _layer()
    before = layer_mse(layer, [(x, y)])
    stats = adaquant_layer(layer, x, y, AdaQuantOptions(iters=100, eval_every=10))
    assert stats.mse_before == pytest.approx(before, rel=1e-6)
    assert stats.mse_after < 0.9 * stats.mse_before  # min-max 4-bit leaves room to gain
    # the layer now computes exactly the reported best iterate
    assert layer_mse(layer, [(x, y)]) == pytest.approx(stats.mse_after, rel=1e-5)
    assert stats.samples == 200 and stats.iters == 100 and 0 < stats.best_iter <= 100
    zp = layer.w_quant.zero_point.detach()
    assert torch.equal(zp, torch.round(zp))


def test_adaquant_never_worse_even_with_absurd_learning_rates() -> None:
    layer, x, y = _layer()
    opts = AdaQuantOptions(iters=20, eval_every=5, lr_weight=50.0, lr_bias=10.0, lr_w_qparams=5.0,
                           lr_a_qparams=5.0)
    stats = adaquant_layer(layer, x, y, opts)
    assert stats.mse_after <= stats.mse_before
    assert layer_mse(layer, [(x, y)]) <= stats.mse_before * (1 + 1e-6)


def test_zero_iterations_leave_the_layer_bit_exact() -> None:
    layer, x, y = _layer()
    before = copy.deepcopy(layer.state_dict())
    adaquant_layer(layer, x, y, AdaQuantOptions(iters=0))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adaquant_layer_rejects_mismatched_targets() -> None:
    layer, x, y = _layer()
    with pytest.raises(ValueError, match="same number of samples"):
        adaquant_layer(layer, x, y[:10])


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="mode"):
        AdaQuantOptions(mode="both")
    with pytest.raises(ValueError, match="batch_size"):
        AdaQuantOptions(batch_size=0)


def _two_linear_model() -> tuple[nn.Module, CalibrationData]:
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    calib = CalibrationData(torch.randn(30, 6, generator=g), batch_size=10)
    return model, calib


def test_sequential_inputs_come_from_quantized_prefix_for_every_batch() -> None:
    model, calib = _two_linear_model()
    q = quantize(model, calib, Recipe(w_bits=3, a_bits=3, first_last_8bit=False))
    ref = copy.deepcopy(q)
    with quantizers_disabled(ref), torch.no_grad():
        seq = collect_layer_io("2", q, ref, calib, True, ActivationCache())
        par = collect_layer_io("2", q, ref, calib, False, ActivationCache())
        assert len(seq) == len(calib) == 3
        for i, batch in enumerate(calib):
            x_q = torch.relu(q[0](batch))  # quantized prefix, every batch (not just the first)
            x_f = torch.relu(model[0](batch))
            y_f = model[2](x_f)
            assert torch.allclose(seq[i][0], x_q, atol=1e-6)
            assert not torch.allclose(x_q, x_f, atol=1e-3)
            assert torch.allclose(par[i][0], x_f, atol=1e-6)
            assert torch.allclose(seq[i][1], y_f, atol=1e-6) and torch.allclose(par[i][1], y_f, atol=1e-6)


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_step_reports_every_layer_and_never_worse(tiny: nn.Module, tiny_data: torch.Tensor,
                                                  mode: str) -> None:
    recipe = Recipe(w_bits=4, a_bits=4).with_steps(
        StepSpec("adaquant", {"mode": mode, "iters": 20, "eval_every": 5, "memory_budget_mb": 0.01}))
    q = quantize(tiny, tiny_data, recipe)
    for name in ("conv1", "dw", "fc"):
        s = q.report.layers[name]["adaquant"]
        assert s["mse_after"] <= s["mse_before"] and s["iters"] == 20 and s["seconds"] >= 0
    summary = q.report.steps[1]
    assert summary["step"] == "adaquant" and summary["layers"] == 3 and summary["mode"] == mode
    assert summary["cache_peak_disk_mb"] > 0  # 10 kB budget: conv inputs spilled to disk


def test_interrupt_leaves_user_model_untouched_and_says_how_far(tiny: nn.Module, tiny_data: torch.Tensor,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    original = copy.deepcopy(tiny.state_dict())
    real = aq.adaquant_layer
    calls = {"n": 0}

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(aq, "adaquant_layer", interrupted)
    recipe = Recipe(w_bits=4, a_bits=4).with_steps(StepSpec("adaquant", {"iters": 2}))
    with pytest.raises(KeyboardInterrupt, match="after 1 of 3 layers .last finished: conv1"):
        quantize(tiny, tiny_data, recipe)
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_activation_cache_spills_and_cleans_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    a, b = torch.arange(12.0).reshape(3, 4), torch.ones(3, 2)
    with ActivationCache(budget_bytes=a.numel() * 4 + b.numel() * 4, spill_dir=tmp_path) as cache:
        cache.append(a, b)
        cache.append(a + 1, b * 2)
        assert cache.memory_bytes == 72 and cache.disk_bytes == 72 and cache.spilled
        assert len(list(tmp_path.iterdir())) == 1
        assert torch.equal(cache[1][0], a + 1) and torch.equal(cache[1][1], b * 2)
        assert cache.num_samples == 6 and len(cache) == 2
    assert list(tmp_path.iterdir()) == []


def test_sequential_float_layer_target_is_float_layer_on_quantized_input() -> None:
    model, calib = _two_linear_model()
    q = quantize(model, calib, Recipe(w_bits=3, a_bits=3, first_last_8bit=False))
    ref = copy.deepcopy(q)
    with quantizers_disabled(ref), torch.no_grad():
        loc = collect_layer_io("2", q, ref, calib, True, ActivationCache(), target="float_layer")
        par = collect_layer_io("2", q, ref, calib, False, ActivationCache(), target="float_layer")
        for i, batch in enumerate(calib):
            x_q = torch.relu(q[0](batch))
            x_f = torch.relu(model[0](batch))
            assert torch.allclose(loc[i][0], x_q, atol=1e-6)
            assert torch.allclose(loc[i][1], model[2](x_q), atol=1e-6)  # W x_q + b
            # parallel mode: the target choice is moot, float input and float output
            assert torch.allclose(par[i][0], x_f, atol=1e-6)
            assert torch.allclose(par[i][1], model[2](x_f), atol=1e-6)
    with pytest.raises(ValueError, match="target must be one of"):
        collect_layer_io("2", q, ref, calib, True, ActivationCache(), target="quantized")
    with pytest.raises(ValueError, match="target"):
        AdaQuantOptions(target="local")


def test_step_summary_records_the_target(tiny: nn.Module, tiny_data: torch.Tensor) -> None:
    recipe = Recipe(w_bits=4, a_bits=4).with_steps(
        StepSpec("adaquant", {"target": "float_layer", "iters": 5, "eval_every": 5}))
    q = quantize(tiny, tiny_data, recipe)
    assert q.report.steps[1]["target"] == "float_layer"
    for name in ("conv1", "dw", "fc"):
        s = q.report.layers[name]["adaquant"]
        assert s["mse_after"] <= s["mse_before"]
