"""int_outputs on residual nets: shared quantizers on add outputs, integer adds and pooling in ONNX
Runtime, simulated == deployed within 2 LSB, packed round trip with module output quantizers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ptqkit
from ptqkit.algorithms.int_outputs import OUT_ATTR, output_quantizers, plan_int_tensors
from ptqkit.nn.modules import quant_layers

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from ptqkit.export.onnx import export_onnx, optimized_op_counts, ort_load  # noqa: E402

FAST = {"w_range": "minmax", "a_range": "minmax"}
# 7-bit symmetric weights: ORT's U8S8 kernels without VNNI cannot saturate their int16 pair sums
DEPLOY = ptqkit.Recipe(w_bits=7, w_symmetric=True, first_last_8bit=False, **FAST).with_steps("int_outputs")


class Block(nn.Module):
    """conv-bn-relu-conv-bn + identity; ReLU after the add (ResNet) or not (MobileNetV2)."""

    def __init__(self, c: int, relu_after: bool) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.relu_after = relu_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x
        return self.relu(out) if self.relu_after else out


class ResNetLike(nn.Module):
    """stem conv-relu, two residual blocks, global average pooling, flatten, linear head."""

    def __init__(self, relu_after: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(Block(8, relu_after), Block(8, relu_after))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def _model(relu_after: bool) -> nn.Module:
    torch.manual_seed(3)
    model = ResNetLike(relu_after)
    g = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(8, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    return model.eval()


def test_plan_finds_block_outputs():
    qmodel = ptqkit.quantize(_model(True), torch.randn(8, 1, 8, 8), ptqkit.Recipe(**FAST))
    sites, skipped = plan_int_tensors(qmodel)
    outputs = {s.site: s.consumers for s in sites if s.kind == "output"}
    # block 0 feeds block 1's conv1 (quantized) and its add; block 1 feeds only the pooling
    assert outputs == {"blocks.0": ["blocks.1.conv1"], "blocks.1": []} and skipped == []
    convs = {s.site: (s.act, s.consumers) for s in sites if s.kind == "o_quant"}
    assert convs == {"stem.0": ("relu", ["blocks.0.conv1"]), "blocks.0.conv2": (None, []),
                     "blocks.1.conv2": (None, [])}


@pytest.mark.parametrize("relu_after", [True, False])
def test_shared_quantizer_is_the_consumers(relu_after, tiny_data):
    x = tiny_data[:32]
    qmodel = ptqkit.quantize(_model(relu_after), x, DEPLOY)
    shared = output_quantizers(qmodel)
    assert sorted(shared) == ["blocks.0", "blocks.1"]
    # block 0's output quantizer copies blocks.1.conv1's input qparams, so that layer's own input
    # quantizer is an exact no-op on the shared tensor: every consumer sees the same values
    a_quant = qmodel.get_submodule("blocks.1.conv1").a_quant
    for got, want in zip(shared["blocks.0"].qparams(), a_quant.qparams()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    seen = {}
    hook = qmodel.get_submodule("blocks.0").register_forward_hook(
        lambda m, a, out: seen.setdefault("t", out))
    with torch.no_grad():
        qmodel(x)
    hook.remove()
    torch.testing.assert_close(a_quant(seen["t"]), seen["t"], rtol=0, atol=0)
    if relu_after:  # post-ReLU data: zero-point 0, so the export can drop the ReLU
        assert float(shared["blocks.1"].qparams()[1]) == 0.0


@pytest.mark.parametrize("relu_after", [True, False])
def test_integer_adds_and_pooling_match_simulated(relu_after, tiny_data, tmp_path):
    qmodel = ptqkit.quantize(_model(relu_after), tiny_data, DEPLOY)
    export_onnx(qmodel, tmp_path / "m.onnx", tiny_data[:1])
    ops = optimized_op_counts(tmp_path / "m.onnx", tmp_path)
    assert ops["QLinearConv"] == 5 and ops["QLinearAdd"] == 2 and ops["QGemm"] == 1
    assert ops["QLinearGlobalAveragePool"] == 1
    assert ops["Add"] == ops["Relu"] == ops["GlobalAveragePool"] == ops["DequantizeLinear"] == 0
    with torch.no_grad():
        sim = qmodel(tiny_data).numpy()
    out = ort_load(tmp_path / "m.onnx").run(None, {"input": tiny_data.numpy()})[0]
    lsb = float(sim.max() - sim.min()) / 255
    assert np.abs(out - sim).max() <= 2 * lsb


def test_exported_graph_is_clean(tiny_data, tmp_path):
    qmodel = ptqkit.quantize(_model(True), tiny_data, DEPLOY)
    export_onnx(qmodel, tmp_path / "m.onnx", tiny_data[:1])
    graph = onnx.load(tmp_path / "m.onnx").graph
    producer = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in producer:
            # no DQ -> Q requantization left (shared qparams), no Relu in front of a zp-0 Q
            assert producer[n.input[0]].op_type not in ("DequantizeLinear", "Relu", "Flatten")
    ops = [n.op_type for n in graph.node]
    assert ops.count("Relu") == 0 and ops.count("Add") == 2
    i_flat, i_pool = ops.index("Flatten"), ops.index("GlobalAveragePool")
    assert ops[i_pool + 1:i_flat] == ["QuantizeLinear"]  # Q moved in front of the Flatten


def test_flat_forward_add_stays_float_with_note(tiny, tiny_data):
    # TinyNet's add sits in the model's own forward and feeds a mean: no module returns it
    qmodel = ptqkit.quantize(tiny, tiny_data, DEPLOY)
    assert output_quantizers(qmodel) == {}
    assert any("stay float" in n for n in qmodel.report.notes)


def test_untraceable_model_keeps_float(tiny_data):
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y if y.sum() > 0 else -y  # data-dependent control flow: fx cannot trace

    qmodel = ptqkit.quantize(Dynamic().eval(), tiny_data, DEPLOY)
    assert all(m.o_quant is None for m in quant_layers(qmodel).values())
    assert any("int_outputs skipped" in n for n in qmodel.report.notes)


@pytest.mark.parametrize("relu_after", [True, False])
def test_packed_roundtrip_with_shared_quantizers(relu_after, tiny_data, tmp_path):
    qmodel = ptqkit.quantize(_model(relu_after), tiny_data, ptqkit.Recipe(
        w_bits=4, w_symmetric=True, **FAST).with_steps("int_outputs"))
    ptqkit.save(qmodel, tmp_path / "q.safetensors")
    loaded = ptqkit.load(tmp_path / "q.safetensors", lambda: ResNetLike(relu_after))
    assert sorted(output_quantizers(loaded)) == ["blocks.0", "blocks.1"]
    assert hasattr(loaded.get_submodule("blocks.0"), OUT_ATTR)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiny_data), qmodel(tiny_data), rtol=0, atol=0)


@pytest.mark.parametrize("a_bits", [6, 7])
def test_sub_8bit_activations_keep_8bit_residuals(a_bits, tiny_data, tmp_path):
    # consumers on a 6/7-bit grid do not donate their qparams: the residual stream gets its own
    # 8-bit quantizers, and each consumer re-quantizes to its grid (still equal to ONNX Runtime)
    recipe = ptqkit.Recipe(w_bits=4, a_bits=a_bits, w_symmetric=True, first_last_8bit=False,
                           **FAST).with_steps("int_outputs")
    qmodel = ptqkit.quantize(_model(True), tiny_data, recipe)
    assert all(q.spec.bits == 8 for q in output_quantizers(qmodel).values())
    assert qmodel.report.layer("stem.0")["o_range"] == "calibrated"
    export_onnx(qmodel, tmp_path / "m.onnx", tiny_data[:1])
    with torch.no_grad():
        sim = qmodel(tiny_data).numpy()
    out = ort_load(tmp_path / "m.onnx").run(None, {"input": tiny_data.numpy()})[0]
    # one rounding flip on a coarse grid moves the output by about one a_bits step (bias int32
    # rounding and float summation order flip some; as without int_outputs): 2 LSB of that grid
    assert np.abs(out - sim).max() <= 2 * float(sim.max() - sim.min()) / (2**a_bits - 1)


def test_run_dir_roundtrip_with_shared_quantizers(tiny_data, tmp_path):
    from ptqkit.runs import ModelSource, load_run, save_run

    (tmp_path / "net.py").write_text("from tests.export.test_int_tensors import ResNetLike\n\n"
                                     "def make():\n    return ResNetLike(True)\n")
    model = _model(True)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    qmodel = ptqkit.quantize(model, tiny_data, DEPLOY)
    save_run(tmp_path / "run", qmodel, ModelSource(f"{tmp_path / 'net.py'}:make", str(tmp_path / "w.pt")),
             DEPLOY, tiny_data[:1])
    loaded, _, _ = load_run(tmp_path / "run")
    assert sorted(output_quantizers(loaded)) == ["blocks.0", "blocks.1"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiny_data), qmodel(tiny_data), rtol=0, atol=0)


class PooledStem(nn.Module):
    """torchvision-ResNet-like stem: conv-bn-relu -> max-pool, which feeds the first skip branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.block = Block(8, relu_after=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.block(x)), 1))


def test_float_op_feeding_an_add_gets_a_shared_quantizer(tiny_data, tmp_path):
    qmodel = ptqkit.quantize(PooledStem().eval(), tiny_data, DEPLOY)
    assert sorted(output_quantizers(qmodel)) == ["block", "maxpool"]
    export_onnx(qmodel, tmp_path / "m.onnx", tiny_data[:1])
    ops = optimized_op_counts(tmp_path / "m.onnx", tmp_path)
    assert ops["QLinearAdd"] == 1 and ops["Add"] == 0 and ops["QLinearConv"] == 3
    with torch.no_grad():
        sim = qmodel(tiny_data).numpy()
    out = ort_load(tmp_path / "m.onnx").run(None, {"input": tiny_data.numpy()})[0]
    assert np.abs(out - sim).max() <= 2 * float(sim.max() - sim.min()) / 255


def test_biases_sit_on_the_int32_grid(tiny_data):
    from ptqkit.algorithms.int_outputs import snap_bias

    # hand-checkable: s_x * s_w = 0.5 * [0.1, 0.2] -> grid steps 0.05 and 0.1
    got = snap_bias(torch.tensor([0.12, -0.26]), torch.tensor(0.5), torch.tensor([0.1, 0.2]))
    torch.testing.assert_close(got, torch.tensor([0.1, -0.3]), rtol=0, atol=1e-7)
    qmodel = ptqkit.quantize(_model(True), tiny_data, DEPLOY)
    for layer in quant_layers(qmodel).values():
        step = (layer.a_quant.qparams()[0] * layer.w_quant.qparams()[0]).double()
        k = layer.bias.double() / step
        torch.testing.assert_close(k, torch.round(k), rtol=1e-6, atol=1e-6)  # float32 bias
    assert any("biases snapped" in n for n in qmodel.report.notes)
