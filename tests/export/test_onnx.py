"""ONNX QDQ export: ONNX Runtime vs the simulated model, integer kernels, exact integer weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.conftest import ort_safe, ort_saturates
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
def test_ort_matches_simulated_within_2_lsb(tiny, tiny_data, tmp_path, model_fn, bits, request):
    if bits[1] < 8 and ort_saturates():
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "known gap: on x86 CPUs without VNNI, ONNX Runtime's integer kernels differ from the "
            "simulation by 3-10 output LSB when activations are below 8 bits")))
    model = tiny if model_fn == "tiny" else ConvChain().eval()
    qmodel = ptqkit.quantize(model, tiny_data, ptqkit.Recipe(a_bits=bits[1], **ort_safe(bits[0], **FAST)))
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


class Relu6Head(nn.Module):
    """conv -> ReLU6 -> global pool -> linear, the conv saturating at 6 (EfficientNet's head)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():
            self.conv.weight.mul_(20.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.act(self.conv(x)), 1), 1))


def test_relu6_before_pooling_is_dropped_and_pooling_fuses(tiny_data, tmp_path):
    """The conv's output grid is [0, 6] (step 6/255): in float32 the DQ never exceeds 6, so the
    Clip is a no-op, and DQ -> GlobalAveragePool -> Q fuses into QLinearGlobalAveragePool."""
    recipe = ptqkit.Recipe(**ort_safe(8, first_last_8bit=False, **FAST)).with_steps("int_outputs")
    qmodel = ptqkit.quantize(Relu6Head().eval(), tiny_data, recipe)
    s, z = quant_layers(qmodel)["conv"].o_quant.qparams()
    assert int(z) == 0 and float(s) * 255 > 6.0  # 6/255 in float32, times 255 in float64
    info = export_onnx(qmodel, tmp_path / "m.onnx", tiny_data[:1])
    ops = optimized_op_counts(tmp_path / "m.onnx", tmp_path)
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["QLinearConv"] == 1 and ops["QGemm"] == 1
    assert ops["Clip"] == 0 and ops["GlobalAveragePool"] == 0 and info.float_layers == []
    with torch.no_grad():
        sim = qmodel(tiny_data)
    assert np.abs(_run(tmp_path / "m.onnx", tiny_data) - sim.numpy()).max() <= 2 * _out_lsb(sim)


def test_asymmetric_8bit_weights_are_named_with_the_fix(tiny, tiny_data, tmp_path, caplog):
    qmodel = ptqkit.quantize(tiny, tiny_data, ptqkit.Recipe(w_symmetric=False, **FAST))
    with caplog.at_level("WARNING", logger="ptqkit.export.onnx"):
        info = export_onnx(qmodel, tmp_path / "m.onnx", tiny_data[:1])
    note = next(n for n in info.notes if "uint8" in n)
    assert "3 layers" in note and "conv1" in note and "w_symmetric=True" in note
    assert any("w_symmetric=True" in r.getMessage() for r in caplog.records)
    sym = ptqkit.quantize(tiny, tiny_data, ptqkit.Recipe(w_symmetric=True, **FAST))
    assert not any("uint8" in n for n in export_onnx(sym, tmp_path / "s.onnx", tiny_data[:1]).notes)


@pytest.mark.parametrize(("w_bits", "vnni", "warned"), [(8, [], True), (7, [], False),
                                                        (8, ["avx512_vnni"], False)])
def test_full_range_int8_weights_warn_on_x86_without_vnni(tiny, tiny_data, tmp_path, monkeypatch,
                                                          caplog, w_bits, vnni, warned):
    import ptqkit.export.onnx as ex

    monkeypatch.setattr(ex, "cpu_info", lambda: {"model": "test", "x86": True, "vnni": vnni})
    recipe = ptqkit.Recipe(w_bits=w_bits, w_symmetric=True, first_last_8bit=False, **FAST)
    qmodel = ptqkit.quantize(tiny, tiny_data, recipe)
    with caplog.at_level("WARNING", logger="ptqkit.export.onnx"):
        info = export_onnx(qmodel, tmp_path / "m.onnx", tiny_data[:1])
    assert all((v["w_max_abs"] > 64) == (w_bits == 8) for v in info.layers.values())
    hits = [n for n in info.notes if "VNNI" in n]
    logged = [r for r in caplog.records if "VNNI" in r.getMessage()]
    assert bool(hits) == warned and bool(logged) == warned
    if warned:
        assert "7-bit" in hits[0] and "reduce_range" in hits[0] and "saturating int16" in hits[0]


def test_layers_left_in_float_are_named(tiny_data, tmp_path):
    model = ConvChain().eval()
    plain = ptqkit.quantize(model, tiny_data, ptqkit.Recipe(**FAST))
    info = export_onnx(plain, tmp_path / "m.onnx", tiny_data[:1])
    assert info.float_layers == ["conv2"]  # feeds a float mean: no output Q, no QLinearConv
    assert any("conv2" in n and "int_outputs" in n for n in info.notes)
    fused = ptqkit.quantize(model, tiny_data, ptqkit.Recipe(**FAST).with_steps("int_outputs"))
    info = export_onnx(fused, tmp_path / "f.onnx", tiny_data[:1])
    assert info.float_layers == [] and not any("int_outputs" in n for n in info.notes)


def test_cpu_info_reads_model_and_vnni_flags(tmp_path):
    from ptqkit.export.onnx import cpu_info

    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 avx_vnni\n"
                 "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse2 avx2 avx_vnni\n")
    info = cpu_info(f)
    assert info["model"] == "Test CPU 9000" and info["vnni"] == ["avx_vnni"]
    assert cpu_info(tmp_path / "missing")["model"] == "unknown"
