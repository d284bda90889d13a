from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptqkit.algorithms import adaquant as aq
from ptqkit.algorithms.adaquant import AdaQuantOptions, adaquant_layer, collect_layer_io, layer_mse
from ptqkit.algorithms.range_init import START_CANDIDATES
from ptqkit.calib.cache import ActivationCache
from ptqkit.calib.data import CalibrationData
from ptqkit.calib.loss import kl_to_float
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
    return _minmax_ranges(layer, torch.relu(torch.randn(200, 16, generator=g)))


def _minmax_ranges(layer: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Min-max ranges on the layer's weights (per channel) and on x; returns (layer, x, float y)."""
    with torch.no_grad():
        w = layer.weight.reshape(layer.weight.shape[0], -1)
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


# --- held-out iterate selection ---------------------------------------------------------------

def _conv_layer(bits: int = 4) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from ptqkit.nn.modules import QuantConv2d
    g = torch.Generator().manual_seed(5)
    fl = nn.Conv2d(4, 6, 3, padding=1)
    layer = QuantConv2d(fl, QuantSpec(bits), QuantSpec(bits))
    x = torch.relu(torch.randn(1, 4, 8, 8, generator=g))  # one "image": 64 positions, fan-in 36
    return _minmax_ranges(layer, x)


@pytest.mark.parametrize(("n", "holdout", "kind"), [
    (200, "auto", "none"),      # 200 samples >= fan-in 16: plain rule
    (10, "auto", "samples"),    # 10 < 16, enough samples to hold some out
    (3, "auto", "frozen"),      # a linear layer on 3 samples has no positions to hold out
    (10, "never", "none"),
    (200, "always", "samples"),
])
def test_holdout_rule(n: int, holdout: str, kind: str) -> None:
    layer, x, y = _layer()
    stats = adaquant_layer(layer, x[:n], y[:n], AdaQuantOptions(iters=10, eval_every=5, holdout=holdout))
    assert stats.holdout == kind


def test_holdout_positions_for_one_image_conv() -> None:
    layer, x, y = _conv_layer()
    assert aq._holdout_kind(layer, [(x, y)], AdaQuantOptions()) == "positions"  # 1 sample < 36
    split = aq._make_split(layer, [(x, y)], "positions", 0.25, torch.Generator().manual_seed(0))
    assert split.masks[0].shape == (1, 1, 8, 8) and int(split.masks[0].sum()) == 16  # 25% of 64
    # fit values per output channel: 48 positions >= fan-in 36, so the weights are learned
    assert aq._fit_constraints(layer, [(x, y)], split) == 48


def test_one_image_on_a_small_map_is_left_unchanged() -> None:
    layer, x, y = _conv_layer()
    small = [(x[..., :7, :7], y[..., :7, :7])]  # 49 positions < 64: nothing to validate on
    assert aq._holdout_kind(layer, small, AdaQuantOptions()) == "frozen"


def test_weights_frozen_when_the_fit_has_fewer_values_than_the_fan_in() -> None:
    layer, x, y = _layer()  # fan-in 16; 6 samples, 2 held out -> 4 fit values per channel
    w0 = layer.weight.detach().clone()
    stats = adaquant_layer(layer, x[:6], y[:6], AdaQuantOptions(iters=20, eval_every=5))
    assert stats.holdout == "samples" and stats.fit_constraints == 4 and stats.weights_frozen
    assert torch.equal(layer.weight.detach(), w0)  # lr_weight 0: the float weights are kept


def test_sample_split_holds_out_a_quarter_across_chunks() -> None:
    layer, x, y = _layer()
    data = [(x[:6], y[:6]), (x[6:10], y[6:10])]
    split = aq._make_split(layer, data, "samples", 0.25, torch.Generator().manual_seed(0))
    assert [m.shape for m in split.masks] == [(6, 1), (4, 1)]
    assert sum(int(m.sum()) for m in split.masks) == 2  # round(0.25 * 10)


@pytest.mark.parametrize("maker", [_layer, _conv_layer])
def test_heldout_selection_is_never_worse_on_held_out_and_all_data(maker) -> None:  # type: ignore[no-untyped-def]
    layer, x, y = maker()
    n = 10 if x.shape[0] > 1 else 1
    opts = AdaQuantOptions(iters=40, eval_every=5, lr_weight=1.0, lr_a_qparams=0.3)  # over-fits
    stats = adaquant_layer(layer, x[:n], y[:n], opts)
    assert stats.holdout in ("samples", "positions")
    assert stats.heldout_after is not None and stats.heldout_before is not None
    assert stats.heldout_after <= stats.heldout_before
    assert stats.mse_after <= stats.mse_before
    assert layer_mse(layer, [(x[:n], y[:n])]) == pytest.approx(stats.mse_after, rel=1e-5)


def test_frozen_layer_is_left_bit_exact() -> None:
    layer, x, y = _layer()
    before = copy.deepcopy(layer.state_dict())
    stats = adaquant_layer(layer, x[:1], y[:1])
    assert stats.holdout == "frozen" and stats.mse_after == stats.mse_before and stats.iters == 0
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_auto_equals_never_when_samples_cover_the_fan_in() -> None:
    a, x, y = _layer()
    b = copy.deepcopy(a)
    adaquant_layer(a, x, y, AdaQuantOptions(iters=30, eval_every=5))
    adaquant_layer(b, x, y, AdaQuantOptions(iters=30, eval_every=5, holdout="never"))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_holdout_options_are_validated() -> None:
    with pytest.raises(ValueError, match="holdout must be one of"):
        AdaQuantOptions(holdout="sometimes")
    with pytest.raises(ValueError, match="holdout_fraction"):
        AdaQuantOptions(holdout_fraction=1.0)


def test_step_summary_counts_holdout_layers(tiny: nn.Module, tiny_data: torch.Tensor) -> None:
    recipe = Recipe(w_bits=4, a_bits=4).with_steps(
        StepSpec("adaquant", {"mode": "parallel", "iters": 4, "eval_every": 2}))
    q = quantize(tiny, tiny_data[:2], recipe)
    counts = q.report.steps[1]["holdout_layers"]
    assert sum(counts.values()) == 3 and counts["none"] == 0
    assert q.report.layers["fc"]["adaquant"]["holdout"] == "frozen"  # linear on 2 samples


# --- start point chosen by calibration loss -----------------------------------------------

def _states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "_quant." in k}


def _start_run(tiny: nn.Module, data: torch.Tensor, start: str = "best", **recipe_kw):  # type: ignore[no-untyped-def]
    recipe = Recipe(w_bits=3, a_bits=3, first_last_8bit=False, **recipe_kw).with_steps(
        StepSpec("adaquant", {"iters": 0, "start": start}))  # 0 iterations: layers stay as started
    q = quantize(tiny, data, recipe)
    return q, q.report.steps[1]


def test_start_best_keeps_the_lowest_calibration_kl_ranges(tiny: nn.Module,
                                                           tiny_data: torch.Tensor) -> None:
    q, s = _start_run(tiny, tiny_data, w_range="minmax", a_range="minmax")
    losses = s["start_losses"]
    assert set(losses) == {"given", "mse", "aciq"}
    assert s["start"] == min(losses, key=losses.get)
    with torch.no_grad():  # the reported loss is the started model's real calibration KL
        assert float(kl_to_float(tiny(tiny_data), q(tiny_data))) == pytest.approx(
            losses[s["start"]], rel=1e-4)
    w, a = {"given": ("minmax", "minmax"), **START_CANDIDATES}[s["start"]]
    plain = quantize(tiny, tiny_data, Recipe(w_bits=3, a_bits=3, first_last_8bit=False,
                                             w_range=w, a_range=a))
    for k, v in _states(plain).items():  # exactly the ranges that recipe sets
        assert torch.equal(_states(q)[k], v), k
    assert q.report.layers["fc"]["w_range"] == w and q.report.layers["fc"]["a_range"] == a


def test_start_candidates_equal_to_the_given_ranges_are_not_tried_again(
        tiny: nn.Module, tiny_data: torch.Tensor) -> None:
    _, s = _start_run(tiny, tiny_data, w_range="mse", a_range="mse")
    assert set(s["start_losses"]) == {"given", "aciq"}


@pytest.mark.parametrize("scripted, chosen, ranges", [
    ([0.1, 0.5, 0.2], "given", ("minmax", "minmax")),  # given best: left bit-exact
    ([1.0, 0.5, 2.0], "mse", ("mse", "mse")),
    ([float("nan"), 0.5, 0.4], "aciq", ("minmax", "aciq")),  # a NaN loss is never chosen
])
def test_start_choice_follows_the_loss(tiny: nn.Module, tiny_data: torch.Tensor,
                                       monkeypatch: pytest.MonkeyPatch, scripted: list[float],
                                       chosen: str, ranges: tuple[str, str]) -> None:
    values = iter(scripted)
    monkeypatch.setattr(aq, "calibration_kl", lambda ctx: next(values))
    q, s = _start_run(tiny, tiny_data, w_range="minmax", a_range="minmax")
    assert s["start"] == chosen and len(s["start_losses"]) == 3
    plain = quantize(tiny, tiny_data, Recipe(w_bits=3, a_bits=3, first_last_8bit=False,
                                             w_range=ranges[0], a_range=ranges[1]))
    for k, v in _states(plain).items():
        assert torch.equal(_states(q)[k], v), k
    assert (q.report.layers["conv1"]["w_range"], q.report.layers["conv1"]["a_range"]) == ranges


def test_start_given_skips_the_choice(tiny: nn.Module, tiny_data: torch.Tensor,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aq, "calibration_kl", lambda ctx: pytest.fail("no loss evaluated"))
    q, s = _start_run(tiny, tiny_data, start="given", w_range="minmax", a_range="minmax")
    assert s["start"] == "given" and "start_losses" not in s
    plain = quantize(tiny, tiny_data, Recipe(w_bits=3, a_bits=3, first_last_8bit=False,
                                             w_range="minmax", a_range="minmax"))
    for k, v in _states(plain).items():
        assert torch.equal(_states(q)[k], v), k
    with pytest.raises(ValueError, match="start must be one of best, given"):
        AdaQuantOptions(start="mse")


def test_start_best_falls_back_to_given_without_outputs_to_compare(
        tiny: nn.Module, tiny_data: torch.Tensor, caplog: pytest.LogCaptureFixture) -> None:
    recipe = Recipe(w_bits=3, a_bits=3, first_last_8bit=False, w_range="minmax",
                    a_range="minmax").with_steps(StepSpec("adaquant", {"iters": 0}))
    q = quantize(tiny, tiny_data, recipe, forward_fn=lambda m, b: m(b) * 0)
    assert q.report.steps[1]["start"] == "given" and "all zero" in caplog.text
    assert q.report.layers["fc"]["a_range"] == "minmax"


def test_start_best_keeps_the_ranges_an_earlier_step_set(tiny: nn.Module, tiny_data: torch.Tensor,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aq, "calibration_kl", lambda ctx: pytest.fail("no loss evaluated"))
    steps = (StepSpec("bias_correction"), StepSpec("adaquant", {"iters": 0}))
    recipe = Recipe(w_bits=3, a_bits=3, first_last_8bit=False, w_range="minmax",
                    a_range="aciq").with_steps(*steps)
    q = quantize(tiny, tiny_data, recipe)
    s = q.report.steps[2]
    assert s["step"] == "adaquant" and s["start"] == "given"
    assert s["start_kept_after"] == ["bias_correction"]
    plain = quantize(tiny, tiny_data, recipe.with_steps(StepSpec("bias_correction")))
    for k, v in _states(plain).items():  # bias correction's quantizer state survives
        assert torch.equal(_states(q)[k], v), k


def test_steps_declare_effects_and_start_best_reads_them() -> None:
    from ptqkit.algorithms import STEPS
    from ptqkit.algorithms.base import EFFECTS, Step, register_step

    assert all(cls.effects <= EFFECTS for cls in STEPS.values())
    keeps = {n for n, cls in STEPS.items() if not cls.effects - aq.START_KEEPS}
    assert {"ranges", "embeddings"} <= keeps and not {"bias_correction", "lapq", "adaquant"} & keeps

    class Odd(Step[object]):
        name = "odd"
        effects = frozenset({"paints_weights"})

    with pytest.raises(ValueError, match=r"unknown effect\(s\) \['paints_weights'\]"):
        register_step(Odd)
    assert "odd" not in STEPS
