"""int_outputs step: output quantizers exactly where ONNX Runtime needs them for integer kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ptqkit
from ptqkit.algorithms.int_outputs import layers_needing_output_quant
from ptqkit.zoo.models import resnet20

pytest.importorskip("onnxruntime")
from ptqkit.export.onnx import export_onnx, optimized_op_counts, ort_load  # noqa: E402

FAST = {"w_range": "minmax", "a_range": "minmax"}


def test_finds_convs_feeding_float_ops(tiny, tiny_data):
    qmodel = ptqkit.quantize(tiny, tiny_data, ptqkit.Recipe(**FAST))
    # conv1 -> relu feeds dw (quantized) and the residual add (float); dw -> relu -> add (float)
    assert layers_needing_output_quant(qmodel) == {"conv1": "relu", "dw": "relu"}


def test_resnet20_residual_convs():
    model = resnet20().eval()
    x = torch.randn(4, 1, 28, 28)
    need = layers_needing_output_quant(ptqkit.quantize(model, x, ptqkit.Recipe(**FAST)))
    blocks = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    expected = {"conv1": "relu", **{f"{b}.conv2": None for b in blocks},
                "layer2.0.downsample.0": None, "layer3.0.downsample.0": None}
    assert need == expected  # block conv1 -> relu -> conv2 needs nothing


def test_all_convs_integer_and_parity(tiny, tiny_data, tmp_path):
    # 7-bit symmetric weights: ORT's U8S8 kernels on AVX2 without VNNI sum pairs of u8*s8
    # products in int16 and can saturate with full-range int8 weights (|q| <= 64 cannot)
    recipe = ptqkit.Recipe(w_bits=7, w_symmetric=True, first_last_8bit=False,
                           **FAST).with_steps("int_outputs")
    qmodel = ptqkit.quantize(tiny, tiny_data, recipe)
    assert qmodel.get_submodule("conv1").o_quant is not None
    export_onnx(qmodel, tmp_path / "m.onnx", tiny_data[:1])
    ops = optimized_op_counts(tmp_path / "m.onnx", tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 1 and ops["Conv"] == 0
    with torch.no_grad():
        sim = qmodel(tiny_data)
    out = ort_load(tmp_path / "m.onnx").run(None, {"input": tiny_data.numpy()})[0]
    assert np.abs(out - sim.numpy()).max() <= 2 * float(sim.max() - sim.min()) / 255


def test_packed_roundtrip_with_output_quantizers(tiny, tiny_data, tmp_path):
    from tests.conftest import TinyNet

    qmodel = ptqkit.quantize(tiny, tiny_data, ptqkit.Recipe(w_bits=4, **FAST).with_steps("int_outputs"))
    ptqkit.save(qmodel, tmp_path / "q.safetensors")
    loaded = ptqkit.load(tmp_path / "q.safetensors", TinyNet)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiny_data), qmodel(tiny_data), rtol=0, atol=0)
