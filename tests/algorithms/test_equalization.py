from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import ptqkit
from ptqkit.algorithms import equalization
from ptqkit.algorithms.equalization import _r1, _r2, find_pairs
from ptqkit.nn.control import quantizers_disabled
from ptqkit.nn.modules import quant_layers

FAST = {"w_range": "minmax", "a_range": "minmax"}


def _bn(c: int, gen: torch.Generator, beta: float = 1.0) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-1, 1, generator=gen)
    bn.running_var.uniform_(0.1, 4, generator=gen)
    bn.weight.data.uniform_(0.05, 3, generator=gen)
    bn.bias.data.uniform_(-beta, 2 * beta, generator=gen)
    return bn


class Separable(nn.Module):
    """conv -> BN -> ReLU -> depthwise -> BN -> act -> 1x1 -> ReLU -> pool -> linear."""

    def __init__(self, act: nn.Module, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1, self.b1, self.a1 = nn.Conv2d(3, 8, 3, padding=1), _bn(8, g), nn.ReLU()
        self.dw, self.b2, self.a2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), _bn(8, g), act
        self.pw, self.a3 = nn.Conv2d(8, 16, 1), nn.ReLU()
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():  # uneven channel ranges, as in real depthwise-separable nets
            self.c1.weight.mul_(torch.logspace(-1, 1, 8).reshape(-1, 1, 1, 1))
            self.dw.weight.mul_(torch.logspace(1, -1, 8).reshape(-1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a1(self.b1(self.c1(x)))
        x = self.a2(self.b2(self.dw(x)))
        x = self.a3(self.pw(x))
        return self.fc(x.mean(dim=(2, 3)))


def _quantize(model: nn.Module, x: torch.Tensor, **options) -> nn.Module:  # type: ignore[no-untyped-def]
    recipe = ptqkit.Recipe(**FAST, steps=[{"name": "equalize", "options": options}])
    return ptqkit.quantize(model, x, recipe)


def _float_out(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), quantizers_disabled(q):
        return q(x)


def test_equalization_through_relu_keeps_the_function_and_balances_the_ranges() -> None:
    model, x = Separable(nn.ReLU()).eval(), torch.randn(32, 3, 12, 12)
    q = _quantize(model, x, guard=False, iters=30)
    step = q.report.steps[1]
    assert step["step"] == "equalize" and step["pairs"] == 2 and step["kept"]
    with torch.no_grad():
        assert_close(_float_out(q, x), model(x), rtol=1e-4, atol=1e-4)
    layers = quant_layers(q)
    # the weights criterion leaves both ranges at sqrt(r1 r2): r1 of L1 equals r2 of L2 per channel
    assert_close(_r1(layers["c1"]), _r2(layers["dw"]), rtol=1e-3, atol=0)
    assert float(_r2(layers["dw"]).max() / _r2(layers["dw"]).min()) < 10  # was 100x before
    # layer SQNRs are measured against the equalized float layers (not the stale outputs)
    assert min(v["sqnr_db"] for v in q.report.layers.values()) > 25


def test_relu6_pairs_are_skipped_or_the_relu6_becomes_relu() -> None:
    model, x = Separable(nn.ReLU6()).eval(), torch.randn(32, 3, 12, 12)
    skip = _quantize(model, x, guard=False, relu6="skip")
    assert skip.report.steps[1]["pairs"] == 1 and isinstance(skip.a2, nn.ReLU6)
    relu = _quantize(model, x, guard=False, relu6="relu")
    assert relu.report.steps[1]["pairs"] == 2 and relu.report.steps[1]["relu6_replaced"] == 1
    assert type(relu.a2) is nn.ReLU
    assert isinstance(model.a2, nn.ReLU6)  # the user's model is untouched


def test_a_relu6_also_called_outside_a_pair_is_not_replaced() -> None:
    class Shared(Separable):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.a2(self.b1(self.c1(x)))
            x = self.a2(self.b2(self.dw(x)))  # the same ReLU6 in a pair ...
            return self.fc(self.a2(self.a3(self.pw(x))).mean(dim=(2, 3)))  # ... and after one

    model, x = Shared(nn.ReLU6()).eval(), torch.randn(16, 3, 12, 12)
    assert not any(p.relu6 for p in find_pairs(_quantize(model, x, guard=False, relu6="skip")))
    q = _quantize(model, x, guard=False, relu6="relu")
    assert isinstance(q.a2, nn.ReLU6) and q.report.steps[1]["relu6_replaced"] == 0


def test_activation_criterion_balances_input_ranges_against_weight_columns() -> None:
    model, x = Separable(nn.ReLU()).eval(), torch.randn(32, 3, 12, 12)
    q = _quantize(model, x, guard=False, criterion="activations", iters=1)
    seen: list[torch.Tensor] = []
    layers = quant_layers(q)

    def record(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0].abs().amax(dim=(0, 2, 3)))

    hook = layers["pw"].register_forward_pre_hook(record)
    _float_out(q, x)
    hook.remove()
    live = seen[0] > 0  # a channel that is always zero keeps its scale
    assert int(live.sum()) >= 6
    assert_close(seen[0][live], _r2(layers["pw"])[live], rtol=1e-3, atol=1e-6)


def test_bias_absorption_moves_a_provably_positive_offset_into_the_next_layer() -> None:
    class Pointwise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(1)
            self.c1, self.b1, self.a1 = nn.Conv2d(3, 8, 1), _bn(8, g, beta=20.0), nn.ReLU()
            with torch.no_grad():
                self.b1.weight.fill_(0.5)
            self.c2 = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c2(self.a1(self.b1(self.c1(x))))

    model, x = Pointwise().eval(), torch.randn(16, 3, 6, 6) * 0.1
    q = _quantize(model, x, guard=False, iters=1)
    assert q.report.steps[1]["biases_absorbed"] == 1
    with torch.no_grad():
        assert_close(_float_out(q, x), model(x), rtol=1e-4, atol=1e-4)
    off = _quantize(model, x, guard=False, iters=1, absorb_bias=False)
    assert off.report.steps[1]["biases_absorbed"] == 0
    assert not torch.equal(quant_layers(q)["c2"].bias, quant_layers(off)["c2"].bias)


def test_guard_restores_the_model_when_the_loss_does_not_drop(monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = Separable(nn.ReLU6()).eval(), torch.randn(16, 3, 12, 12)
    plain = ptqkit.quantize(model, x, ptqkit.Recipe(**FAST))
    losses = iter([1.0, 2.0])  # before, after: worse
    monkeypatch.setattr(equalization, "calibration_kl", lambda ctx: next(losses))
    q = _quantize(model, x, relu6="relu")
    step = q.report.steps[1]
    assert step["pairs"] == 2 and not step["kept"] and isinstance(q.a2, nn.ReLU6)
    for name, layer in quant_layers(q).items():
        ref = quant_layers(plain)[name]
        assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.w_quant.scale,
                                                                      ref.w_quant.scale)


def test_untraceable_model_is_left_alone() -> None:
    class Dynamic(Separable):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.a1(self.b1(self.c1(x)))
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 1.0
            x = self.a2(self.b2(self.dw(x)))
            return self.fc(self.a3(self.pw(x)).mean(dim=(2, 3)))

    model, x = Dynamic(nn.ReLU()).eval(), torch.randn(8, 3, 12, 12)
    q = _quantize(model, x, guard=False)
    assert q.report.steps[1] == {**q.report.steps[1], "pairs": 0, "kept": False}


def test_options_are_checked() -> None:
    for bad in ({"criterion": "range"}, {"relu6": "clip"}, {"iters": 0}):
        with pytest.raises(ValueError, match="equalize"):
            equalization.EqualizeOptions(**bad)
