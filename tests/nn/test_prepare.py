from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from ptqkit.core.spec import QuantSpec
from ptqkit.nn.control import quantizers_disabled
from ptqkit.nn.modules import QuantConv2d, QuantLinear, quant_layers
from ptqkit.nn.prepare import LayerPolicy, prepare, set_layer_bits, weight_symmetry


def _prep(model: nn.Module, x: torch.Tensor, **kw) -> nn.Module:  # type: ignore[no-untyped-def]
    return prepare(model, LayerPolicy(**kw), lambda m: m(x))


def test_prepare_folds_bn_and_keeps_float_function(tiny: nn.Module, tiny_data) -> None:
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    q = _prep(tiny, tiny_data, w_bits=4, a_bits=4)
    # the user's model is untouched
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert isinstance(q.conv1, QuantConv2d) and isinstance(q.dw, QuantConv2d)
    assert isinstance(q.fc, QuantLinear) and isinstance(q.bn1, nn.Identity)
    assert q.ptq.folded == {"conv1": "bn1", "dw": "bn2"}
    assert q.conv1.folded_bn is not None and q.dw.groups == 8
    with torch.no_grad():
        assert_close(q(tiny_data), tiny(tiny_data), rtol=1e-5, atol=1e-5)


def test_layer_order_and_first_last_policy(tiny: nn.Module, tiny_data) -> None:
    q = _prep(tiny, tiny_data, w_bits=4, a_bits=2)
    layers = quant_layers(q)
    assert list(layers) == ["conv1", "dw", "fc"]
    assert [(m.w_bits, m.a_bits) for m in layers.values()] == [(8, 8), (4, 2), (8, 8)]
    q2 = _prep(tiny, tiny_data, w_bits=4, a_bits=2, first_last_8bit=False,
               overrides={"f*": (3, 5)})
    assert [(m.w_bits, m.a_bits) for m in quant_layers(q2).values()] == [(4, 2), (4, 2), (3, 5)]


def test_include_exclude_patterns(tiny: nn.Module, tiny_data) -> None:
    q = _prep(tiny, tiny_data, exclude=("fc",))
    assert list(quant_layers(q)) == ["conv1", "dw"]
    assert isinstance(q.fc, nn.Linear)
    assert any(s.startswith("fc") for s in q.ptq.stays_float)


def test_unknown_override_is_a_clear_error(tiny: nn.Module, tiny_data) -> None:
    with pytest.raises(ValueError, match="name no quantized layer.*conv1"):
        _prep(tiny, tiny_data, overrides={"nope": (4, 4)})


def test_nothing_selected_is_a_clear_error(tiny: nn.Module, tiny_data) -> None:
    with pytest.raises(ValueError, match="no Conv1d/Conv2d/Linear"):
        _prep(tiny, tiny_data, include=("zzz*",))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 1.0
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def test_untraceable_model_is_quantized_with_bn_unfolded(tiny_data) -> None:
    model = Untraceable().eval()
    with pytest.warns(UserWarning, match="BatchNorm left unfolded: torch.fx could not trace"):
        q = _prep(model, tiny_data)
    assert isinstance(q.conv, QuantConv2d) and isinstance(q.bn, nn.BatchNorm2d)
    assert q.ptq.bn_unfolded_reason


def test_conv1d_is_swapped() -> None:
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6, 3)).eval()
    x = torch.randn(5, 2, 8)
    q = _prep(model, x, w_bits=4, a_bits=4, first_last_8bit=False)
    assert type(q[0]).__name__ == "QuantConv1d"
    with torch.no_grad(), quantizers_disabled(q):
        assert_close(q(x), model(x))


def test_weight_quantizer_is_per_output_channel(tiny: nn.Module, tiny_data) -> None:
    q = _prep(tiny, tiny_data)
    assert q.conv1.w_quant.spec == QuantSpec(8, True, "channel", 0)
    assert q.conv1.w_quant.scale.numel() == 8 and q.conv1.a_quant.scale.numel() == 1


def test_weight_symmetry_is_symmetric_at_8_bits_and_asymmetric_below_unless_fixed(
        tiny: nn.Module, tiny_data) -> None:
    q = _prep(tiny, tiny_data, w_bits=4, a_bits=4)  # first and last layers at 8 bits
    layers = list(quant_layers(q).values())
    assert [m.w_quant.spec.symmetric for m in layers] == [m.w_bits >= 8 for m in layers]
    assert {m.w_bits for m in layers} == {4, 8}
    inner = layers[1]
    set_layer_bits(inner, 8, 8)
    assert inner.w_quant.spec.symmetric and inner.w_bits == 8
    set_layer_bits(inner, 3, 8)
    assert not inner.w_quant.spec.symmetric and inner.w_bits == 3
    for fixed in (True, False):
        q = _prep(tiny, tiny_data, w_bits=4, a_bits=4, w_symmetric=fixed)
        layers = list(quant_layers(q).values())
        assert all(m.w_quant.spec.symmetric is fixed for m in layers)
        set_layer_bits(layers[1], 8, 8)
        assert layers[1].w_quant.spec.symmetric is fixed
    assert [weight_symmetry(None, b) for b in (2, 7, 8, 16)] == [False, False, True, True]
