"""ONNX QDQ export: ONNX Runtime vs the simulated model, integer kernels, exact integer weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.nn.modules import quant_layers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ptqkit.export.onnx import export_onnx, optimized_op_counts, ort_load  # noqa: E402

FAST = {"w_range": "minmax", "a_range": "minmax"}


class ConvChain(nn.Module):
    """conv-bn-relu -> conv-relu -> pool -> linear: every conv output feeds a quantized input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(y.mean((2, 3)))


def _run(path, x: torch.Tensor, optimize: bool = True) -> np.ndarray:
    return ort_load(path, threads=1, optimize=optimize).run(None, {"input": x.numpy()})[0]


def _out_lsb(y: torch.Tensor) -> float:
    """Step of an 8-bit grid spanning the simulated outputs (the 'output scale')."""
    return float(y.max() - y.min()) / 255


@pytest.mark.parametrize("model_fn", ["tiny", "chain"])
@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (3, 5)])
def test_ort_matches_simulated_within_2_lsb(tiny, tiny_data, tmp_path, model_fn, bits):
    model = tiny if model_fn == "tiny" else ConvChain().eval()
    qmodel = ptqkit.quantize(model, tiny_data, ptqkit.Recipe(w_bits=bits[0], a_bits=bits[1], **FAST))
    path = tmp_path / "m.onnx"
    export_onnx(qmodel, path, tiny_data[:1])
    with torch.no_grad():
        sim = qmodel(tiny_data)
    err = np.abs(_run(path, tiny_data) - sim.numpy()).max()
    assert err <= 2 * _out_lsb(sim), f"max |ort - sim| = {err:.2e}, 2 LSB = {2 * _out_lsb(sim):.2e}"


def test_symmetric_weights_graph_is_exact(tiny, tiny_data, tmp_path):
    """int8 weights with zero-point 0; checked on ORT's reference (unfused) path because ORT's
    U8S8 kernels on AVX2 without VNNI may saturate 16-bit pair sums (see report)."""
    qmodel = ptqkit.quantize(tiny, tiny_data, ptqkit.Recipe(w_symmetric=True, **FAST))
    export_onnx(qmodel, tmp_path / "m.onnx", tiny_data[:1])
    with torch.no_grad():
        sim = qmodel(tiny_data)
    err = np.abs(_run(tmp_path / "m.onnx", tiny_data, optimize=False) - sim.numpy()).max()
    assert err <= 2 * _out_lsb(sim)


def test_weights_are_the_simulated_integers(tiny, tiny_data, tmp_path):
    qmodel = ptqkit.quantize(tiny, tiny_data, ptqkit.Recipe(w_bits=4, first_last_8bit=False, **FAST))
    export_onnx(qmodel, tmp_path / "m.onnx", tiny_data[:1])
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    for name, layer in quant_layers(qmodel).items():
        q = layer.w_quant.int_repr(layer.weight).numpy()
        found = [v for k, v in inits.items() if k.startswith(f"/{name}/QuantizeLinear")]
        zp = layer.w_quant.qparams()[1].reshape(-1, *[1] * (q.ndim - 1)).numpy()
        assert len(found) == 1 and found[0].dtype == np.int8  # asymmetric 4-bit: q - z in int8
        np.testing.assert_array_equal(found[0].astype(np.int32), q - zp)
    biases = [v for k, v in inits.items() if k.endswith("bias_int32")]
    assert len(biases) == 3 and all(b.dtype == np.int32 for b in biases)


def test_ort_fuses_integer_kernels(tmp_path, tiny_data):
    qmodel = ptqkit.quantize(ConvChain().eval(), tiny_data, ptqkit.Recipe(**FAST))
    export_onnx(qmodel, tmp_path / "m.onnx", tiny_data[:1])
    ops = optimized_op_counts(tmp_path / "m.onnx", tmp_path)
    # conv1 -> relu -> Q(conv2 input) fuses; conv2 feeds a float mean (no Q), so it stays float
    assert ops["QLinearConv"] == 1 and ops["QGemm"] == 1


def test_sub_8bit_notes_and_clip(tiny, tiny_data, tmp_path):
    recipe = ptqkit.Recipe(w_bits=4, a_bits=4, first_last_8bit=False, **FAST)
    qmodel = ptqkit.quantize(tiny, tiny_data, recipe)
    info = export_onnx(qmodel, tmp_path / "m.onnx", tiny_data[:1])
    assert any("8-bit containers" in n for n in info.notes)
    assert all(v["a_container"] == "8-bit, clipped" for v in info.layers.values())
    ops = [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node]
    assert ops.count("Clip") == 3


def test_rejects_float_model(tiny, tiny_data, tmp_path):
    with pytest.raises(ValueError, match="quantized model"):
        export_onnx(tiny, tmp_path / "m.onnx", tiny_data[:1])
