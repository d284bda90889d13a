from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptqkit.algorithms.bn_tuning import (
    BNStats,
    BNTuningOptions,
    batch_moments,
    bn_train_forward,
    float_moments,
    identity_bn,
    refold,
    tune_batchnorm,
)
from ptqkit.calib.data import CalibrationData
from ptqkit.calib.loss import kl_to_float
from ptqkit.nn.control import quantizers_disabled
from ptqkit.nn.modules import FoldedBN
from ptqkit.pipeline import Recipe, StepSpec, quantize


def _conv_bn() -> nn.Module:
    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3))
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        model[1].running_var.copy_(torch.tensor([0.5, 2.0, 1.5]))
        model[1].weight.copy_(torch.tensor([0.7, 1.3, -0.9]))  # a negative gamma too
        model[1].bias.copy_(torch.randn(3, generator=g))
    return model.eval()


def _data() -> CalibrationData:
    return CalibrationData(torch.randn(20, 2, 5, 5, generator=torch.Generator().manual_seed(6)),
                           batch_size=5)


def test_identity_bn_is_the_identity() -> None:
    folded = FoldedBN(torch.tensor([0.5, -2.0]), torch.tensor([0.3, 1.0]), 1e-3, torch.zeros(2),
                      torch.ones(2))
    gamma_r, beta_r, mu, var = identity_bn(folded)
    assert torch.equal(mu, beta_r) and torch.allclose(var, torch.tensor([0.25, 4.0]))
    assert torch.allclose(gamma_r, torch.sqrt(torch.tensor([0.251, 4.001])))
    y = torch.randn(4, 2, 3, 3)
    bn = gamma_r.reshape(1, 2, 1, 1) * (y - mu.reshape(1, 2, 1, 1)) / torch.sqrt(
        var.reshape(1, 2, 1, 1) + 1e-3) + beta_r.reshape(1, 2, 1, 1)
    torch.testing.assert_close(bn, y)


def test_moments_and_train_forward_match_torch_batchnorm() -> None:
    y = torch.randn(6, 3, 4, 4) * 2 + 1
    bn = nn.BatchNorm2d(3, momentum=None).train()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 3.0]))
        ref = bn(y)
        y2 = torch.randn(6, 3, 4, 4)
        bn(y2)
    out = bn_train_forward(y, bn.weight.detach(), bn.bias.detach(), bn.eps)
    torch.testing.assert_close(out, ref)
    stats = BNStats(3)
    stats.update(y)
    stats.update(y2)
    mean, var = stats.result()  # cumulative average == BatchNorm(momentum=None)
    torch.testing.assert_close(mean, bn.running_mean)
    torch.testing.assert_close(var, bn.running_var)
    m, v_biased, v_unbiased = batch_moments(torch.tensor([[1.0, 3.0]]).reshape(2, 1))
    assert m.item() == 2.0 and v_biased.item() == 1.0 and v_unbiased.item() == 2.0


def test_refold_formula_by_hand() -> None:
    w, b, s = refold(torch.tensor([[2.0], [4.0]]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0]),
                     gamma_r=torch.tensor([2.0, 1.0]), beta_r=torch.tensor([0.5, 0.0]),
                     mean=torch.tensor([1.0, 3.0]), var=torch.tensor([4.0, 1.0]), eps=0.0)
    # f = gamma_r / sqrt(var) = [1, 1]; second: [1.0]
    assert w.flatten().tolist() == [2.0, 4.0]
    assert b.tolist() == [0.5, -2.0] and s.tolist() == [0.5, 1.0]


def test_statistics_equal_closed_form_and_integer_weights_unchanged() -> None:
    model, data = _conv_bn(), _data()
    q = quantize(model, data, Recipe(w_bits=4, a_bits=4, first_last_8bit=False))
    layer = q[0]
    codes = layer.w_quant.int_repr(layer.weight)
    folded = layer.folded_bn
    # closed form: cumulative average of per-batch mean / unbiased variance of the quantized output
    with torch.no_grad():
        outs = [layer(b) for b in data]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outs]).mean(0)
    gamma_r = torch.sqrt(folded.gamma ** 2 + folded.eps)
    f = gamma_r / torch.sqrt(var + folded.eps)
    expected_w = layer.weight.detach() * f.reshape(-1, 1, 1, 1)
    expected_b = f * (layer.bias.detach() - mean) + folded.beta
    expected_s = layer.w_quant.scale.detach() * f
    tune_batchnorm(q, data)
    torch.testing.assert_close(layer.weight.detach(), expected_w)
    torch.testing.assert_close(layer.bias.detach(), expected_b)
    torch.testing.assert_close(layer.w_quant.scale.detach(), expected_s)
    assert torch.equal(layer.w_quant.int_repr(layer.weight), codes)
    # the tuned layer's output has the BN's target mean beta_o on the calibration data
    with torch.no_grad():
        tuned = torch.cat([layer(b) for b in data]).mean((0, 2, 3))
    torch.testing.assert_close(tuned, folded.beta, atol=1e-5, rtol=0)


def test_undo_restores_bit_exactly(tiny: nn.Module, tiny_data: torch.Tensor) -> None:
    q = quantize(tiny, tiny_data, Recipe(w_bits=4, a_bits=4))
    before = copy.deepcopy(q.state_dict())
    handle = tune_batchnorm(q, CalibrationData(tiny_data, batch_size=16))
    assert handle.layers == ["conv1", "dw"]  # fc has no folded BN
    assert not torch.equal(q.conv1.weight, before["conv1.weight"])
    handle.undo()
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_step_runs_in_pipeline(tiny: nn.Module, tiny_data: torch.Tensor) -> None:
    q = quantize(tiny, tiny_data, Recipe(w_bits=4, a_bits=4).with_steps("bn_tuning"))
    assert q.report.steps[1]["step"] == "bn_tuning" and q.report.steps[1]["layers"] == 2
    assert q.report.layers["conv1"]["bn_tuned"] is True


def _one_batch() -> CalibrationData:
    return CalibrationData(torch.randn(20, 2, 5, 5, generator=torch.Generator().manual_seed(6)),
                           batch_size=20)


def test_float_target_leaves_a_float_model_unchanged_and_paper_target_does_not() -> None:
    model, data = _conv_bn(), _one_batch()
    q = quantize(model, data, Recipe(w_bits=4, a_bits=4, first_last_8bit=False))
    with quantizers_disabled(q), torch.no_grad():
        ref = q(data.batches[0]).clone()
        handle = tune_batchnorm(q, data, float_moments(q, data))
        torch.testing.assert_close(q(data.batches[0]), ref, atol=1e-5, rtol=1e-5)
        handle.undo()
        tune_batchnorm(q, data)  # the paper's target: the folded BN's training statistics
        assert (q(data.batches[0]) - ref).abs().max() > 1e-2


def test_float_target_matches_float_mean_and_variance_with_integer_weights_unchanged() -> None:
    model, data = _conv_bn(), _one_batch()
    q = quantize(model, data, Recipe(w_bits=3, a_bits=3, first_last_8bit=False))
    layer = q[0]
    x = data.batches[0]
    with quantizers_disabled(q), torch.no_grad():
        f = q(x)
    codes = layer.w_quant.int_repr(layer.weight)
    tune_batchnorm(q, data, float_moments(q, data))
    with torch.no_grad():
        out = q(x)
    torch.testing.assert_close(out.mean((0, 2, 3)), f.mean((0, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var((0, 2, 3)), f.var((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert torch.equal(layer.w_quant.int_repr(layer.weight), codes)


@pytest.mark.parametrize("target", ["best", "bn", "float"])
def test_step_never_raises_the_calibration_kl(tiny: nn.Module, tiny_data: torch.Tensor,
                                              target: str) -> None:
    base = quantize(tiny, tiny_data, Recipe(w_bits=3, a_bits=3))
    recipe = Recipe(w_bits=3, a_bits=3).with_steps(StepSpec("bn_tuning", {"target": target}))
    q = quantize(tiny, tiny_data, recipe)
    summary = q.report.steps[1]
    assert summary["kl_before"] == pytest.approx(_kl(base, base, tiny_data), rel=1e-4)
    if summary["kept"]:
        assert summary["kl_after"] <= summary["kl_before"]
        assert summary["kl_after"] == pytest.approx(_kl(q, base, tiny_data), rel=1e-4)
    else:
        for k, v in base.state_dict().items():
            assert torch.equal(v, q.state_dict()[k]), k
    if target == "best":
        assert summary["target"] == min(summary["kl_by_target"], key=summary["kl_by_target"].get)


def _kl(q: nn.Module, folded_float: nn.Module, x: torch.Tensor) -> float:
    """Calibration KL of q against the BN-folded float model (quantizers of ``folded_float`` off)."""
    data = CalibrationData(x, batch_size=16)
    total = 0.0
    with torch.no_grad():
        for b in data:
            with quantizers_disabled(folded_float):
                ref = folded_float(b)
            total += float(kl_to_float(ref, q(b))) * b.shape[0]
    return total / data.num_samples


def test_unknown_target_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="target must be one of best, float, bn"):
        BNTuningOptions(target="running")


def test_context_cache_is_typed_and_keeps_the_undo_handle(tiny: nn.Module,
                                                          tiny_data: torch.Tensor) -> None:
    from ptqkit.algorithms.base import Cache, Context, Report
    from ptqkit.algorithms.bn_tuning import BNTuning, BNTuningHandle

    q = quantize(tiny, tiny_data, Recipe(w_bits=3, a_bits=3))
    data = CalibrationData(tiny_data, batch_size=16)
    outs = [torch.zeros(2, 3)]
    ctx = Context(q, data, Report(), 0, {"float_outputs": outs})  # a mapping of Cache's fields
    assert isinstance(ctx.cache, Cache) and ctx.float_outputs() is outs
    with pytest.raises(ValueError, match=r"unknown cache key\(s\) \['float_logits'\]"):
        Context(q, data, Report(), 0, {"float_logits": outs})
    ctx = Context(q, data, Report())
    BNTuning(BNTuningOptions(target="bn", guard=False)).run(ctx)
    assert isinstance(ctx.cache.bn_tuning_undo, BNTuningHandle)
