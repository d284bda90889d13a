"""The segment engine: the same layer inputs as full forward passes, one segment pass per layer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptqkit.algorithms import adaquant as aq
from ptqkit.algorithms.adaquant import collect_layer_io
from ptqkit.calib.cache import ActivationCache
from ptqkit.calib.capture import collect_input_samples
from ptqkit.calib.data import CalibrationData
from ptqkit.calib.engine import SegmentEngine
from ptqkit.nn.control import quantizers_disabled
from ptqkit.nn.modules import quant_layers
from ptqkit.pipeline import Recipe, StepSpec, quantize


def _quantized(tiny: nn.Module, data: torch.Tensor) -> nn.Module:
    return quantize(tiny, data, Recipe(w_bits=4, a_bits=4, first_last_8bit=False))


@pytest.mark.parametrize("target", ["float_model", "float_layer"])
def test_walk_gives_the_pairs_of_full_forward_passes(tiny: nn.Module, tiny_data, target) -> None:
    q = _quantized(tiny, tiny_data)
    calib = CalibrationData(tiny_data.split(16))
    ref = copy.deepcopy(q)
    with quantizers_disabled(ref):
        opts = aq.AdaQuantOptions(target=target, memory_budget_mb=0.001)  # spills to disk
        walk = aq._LayerWalk.build(type("Ctx", (), {"qmodel": q, "calib": calib})(), ref,
                                   list(quant_layers(q)), opts)
        assert walk is not None and walk.order == list(quant_layers(q))
        for i, name in enumerate(walk.order):
            with ActivationCache() as got, ActivationCache() as want:
                walk.collect(name, got)
                collect_layer_io(name, q, ref, calib, True, want, target)
                assert len(got) == len(want) == 4
                for (xg, yg), (xw, yw) in zip(got, want):
                    torch.testing.assert_close(xg, xw, rtol=0, atol=0)
                    torch.testing.assert_close(yg, yw, rtol=0, atol=0)
            with torch.no_grad():  # change the layer, as AdaQuant does: later inputs must see it
                quant_layers(q)[name].weight.mul_(0.9 + 0.05 * i)
        walk.close()


def test_adaquant_on_the_engine_equals_full_passes(tiny: nn.Module, tiny_data, monkeypatch) -> None:
    recipe = Recipe(w_bits=4, a_bits=4, steps=(StepSpec("adaquant", {"iters": 20}),))
    fast = quantize(tiny, tiny_data, recipe)
    monkeypatch.setattr(SegmentEngine, "build", classmethod(lambda cls, *a, **k: None))
    slow = quantize(tiny, tiny_data, recipe)
    for (name, a), (_, b) in zip(fast.state_dict().items(), slow.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_untraceable_model_has_no_engine(tiny_data) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = x * 2
            return self.fc(x.flatten(1))

    q = quantize(Branchy(), tiny_data, Recipe(w_bits=8, a_bits=8))
    assert SegmentEngine.build(q, CalibrationData(tiny_data.split(16))) is None


def test_advance_walks_each_segment_once(tiny: nn.Module, tiny_data, monkeypatch) -> None:
    q = _quantized(tiny, tiny_data)
    engine = SegmentEngine.build(q, CalibrationData(tiny_data.split(16)))
    assert engine is not None
    calls: dict[str, int] = {}
    for name, layer in quant_layers(q).items():
        layer.register_forward_pre_hook(lambda m, a, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    front = engine.start()
    for name in engine.layers_in_order():
        front = engine.advance(front, name)
    front.close()
    # every layer but the last ran exactly once per batch (4 batches); the last never ran
    order = engine.layers_in_order()
    assert calls == {n: 4 for n in order[:-1]}


class _TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_padded_tokens_are_left_out_of_activation_statistics() -> None:
    x = torch.rand(2, 4, 3)  # values in [0, 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    x[mask == 0] = 100.0  # padding positions carry outliers
    model = _TokenModel()
    data = CalibrationData([{"x": x, "attention_mask": mask}])
    got = collect_input_samples(model, {"fc": model.fc}, data)["fc"]
    assert got.numel() == 5 * 3 and float(got.max()) < 1.0
    assert torch.equal(got.sort().values, x[mask.bool()].reshape(-1).sort().values)
    plain = CalibrationData([x])  # no mask: every position counts
    model.forward = lambda t: model.fc(t)  # type: ignore[method-assign]
    assert float(collect_input_samples(model, {"fc": model.fc}, plain)["fc"].max()) == 100.0
