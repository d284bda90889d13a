"""Integer-exact inference: the simulated model computes what ONNX Runtime's fused CPU kernels
compute (QLinearConv, QLinearAdd, QLinearGlobalAveragePool, QGemm), checked against direct integer
references and against ONNX Runtime on a small MobileNet-style network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.conftest import ort_safe
from torch import nn

import ptqkit
from ptqkit.core.spec import QuantSpec
from ptqkit.nn import integer
from ptqkit.nn.modules import QuantConv2d, QuantLinear, quant_layers

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from ptqkit.export.onnx import export_onnx, optimized_op_counts, ort_load  # noqa: E402

W8 = QuantSpec(8, symmetric=True, granularity="channel")
A8 = QuantSpec(8, symmetric=False)


def _set(q, scale, zp) -> None:  # type: ignore[no-untyped-def]
    q.set_qparams(torch.as_tensor(scale, dtype=torch.float32), torch.as_tensor(zp, dtype=torch.float32))


def _layer(fl: nn.Module, g: torch.Generator, w_scale: float = 0.01) -> QuantConv2d | QuantLinear:
    cls = QuantConv2d if isinstance(fl, nn.Conv2d) else QuantLinear
    layer = cls(fl, W8, A8)
    out = layer.out_channels
    _set(layer.w_quant, torch.rand(out, generator=g) * w_scale + w_scale / 4, torch.zeros(out))
    _set(layer.a_quant, 0.05, 37)
    layer.o_quant = ptqkit.core.quantizer.Quantizer(A8)
    _set(layer.o_quant, 0.11, 120)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(out, generator=g))
    return layer.eval()


def _reference(layer: QuantConv2d | QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """Direct integer reference: int64 codes, int64 dot products, numpy float32 requantization."""
    s_x, z_x = (float(v) for v in layer.a_quant.qparams())
    xq = np.clip(np.rint(x.numpy() / np.float32(s_x)) + z_x, 0, 255).astype(np.int64) - int(z_x)
    s_w = layer.w_quant.qparams()[0].numpy().astype(np.float32)
    wq = layer.w_quant.int_repr(layer.weight).numpy().astype(np.int64)
    if isinstance(layer, QuantConv2d):
        cols = torch.nn.functional.unfold(torch.from_numpy(xq).double(), layer.kernel_size,
                                          padding=layer.padding, stride=layer.stride)
        acc = np.einsum("nkl,ok->nol", cols.numpy().astype(np.int64), wq.reshape(wq.shape[0], -1))
    else:
        acc = xq @ wq.T
    scale = np.float32(s_x) * s_w
    bias = np.rint(layer.bias.detach().numpy().astype(np.float64) / scale).astype(np.int64)
    shape = (1, -1, 1) if acc.ndim == 3 else (1, -1)
    acc = acc + bias.reshape(shape)
    s_y, z_y = (float(v) for v in layer.o_quant.qparams())
    m = (scale / np.float32(s_y)).astype(np.float32).reshape(shape)
    y = np.clip(np.rint(acc.astype(np.float32) * m), 0 - z_y, 255 - z_y)
    out = torch.from_numpy((y.astype(np.float32) * np.float32(s_y)).astype(np.float32))
    if isinstance(layer, QuantConv2d):
        n, o = out.shape[:2]
        side = int(round(out.shape[2] ** 0.5))
        out = out.reshape(n, o, side, side)
    return out


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(16, 8, 3, padding=1, stride=2),
                                  lambda: nn.Linear(64, 12),
                                  lambda: nn.Linear(2048, 6)])  # 255 * 127 * 2048 > 2^24: float64
def test_integer_requantization_matches_integer_reference(make):
    g = torch.Generator().manual_seed(5)
    fl = make()
    if isinstance(fl, nn.Linear) and fl.in_features == 2048:
        with torch.no_grad():  # full-range weights on every input: partial sums beyond 2^24
            fl.weight.copy_(torch.sign(torch.randn(fl.weight.shape, generator=g)) * 1.27)
    layer = _layer(fl, g)
    if isinstance(fl, nn.Linear) and fl.in_features == 2048:
        _set(layer.w_quant, torch.full((6,), 0.01), torch.zeros(6))
        _set(layer.o_quant, 2000.0, 128)
    shape = (4, 16, 9, 9) if isinstance(fl, nn.Conv2d) else (5, fl.in_features)
    x = torch.randn(shape, generator=g) * 3
    with torch.no_grad():
        got = layer(x)
        with integer.float_simulation():
            flt = layer(x)
    want = _reference(layer, x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the float simulation stays within one step of it (and is what gradients go through)
    assert float((flt - want).abs().max()) <= 0.11 * 1.0001
    y = layer(x.requires_grad_())
    torch.testing.assert_close(y.detach(), flt, rtol=0, atol=0)


def test_float32_accumulation_is_chosen_only_when_exact():
    x = torch.full((1, 2048), 255.0)
    w = torch.full((3, 2048), 127.0)
    acc = integer.integer_accumulate(torch.nn.functional.linear, x, w)
    assert acc.dtype == torch.float64 and float(acc[0, 0]) == 255 * 127 * 2048
    small = integer.integer_accumulate(torch.nn.functional.linear, x[:, :64], w[:, :64])
    assert small.dtype == torch.float32 and float(small[0, 0]) == 255 * 127 * 64


def test_qlinear_add_matches_onnxruntime(tmp_path):
    rng = np.random.default_rng(0)
    n = 1 << 14
    for k in range(4):
        sa, sb, sc = (float(np.float32(v)) for v in rng.uniform(0.005, 0.05, 3))
        za, zb, zc = (int(v) for v in rng.integers(0, 255, 3))
        a = rng.integers(0, 256, n).astype(np.uint8)
        b = rng.integers(0, 256, n).astype(np.uint8)
        text = f"""<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>
        g (uint8[{n}] a, uint8[{n}] b) => (uint8[{n}] c) {{
            sa = Constant <value = float {{{sa!r}}}> ()
            sb = Constant <value = float {{{sb!r}}}> ()
            sc = Constant <value = float {{{sc!r}}}> ()
            za = Constant <value = uint8 {{{za}}}> ()
            zb = Constant <value = uint8 {{{zb}}}> ()
            zc = Constant <value = uint8 {{{zc}}}> ()
            c = com.microsoft.QLinearAdd (a, sa, za, b, sb, zb, sc, zc)
        }}"""
        onnx.save(onnx.parser.parse_model(text), tmp_path / f"add{k}.onnx")
        want = ort_load(tmp_path / f"add{k}.onnx", optimize=False).run(
            None, {"a": a, "b": b})[0].astype(np.float32)
        got = integer.qlinear_add(torch.from_numpy(a).float(), sa, za, torch.from_numpy(b).float(),
                                  sb, zb, sc, zc, 0, 255)
        np.testing.assert_array_equal(got.numpy(), want)
    # a near-tie seen on EfficientNet-Lite0: exact value 214.5000057, the kernel gives 215 (its
    # fixed part is zc - fma(r_a, z_a, r_b z_b); without that FMA the sum rounds to 214.5 -> 214)
    got = integer.qlinear_add(torch.tensor([206.0]), 0.42772161960601807, 114, torch.tensor([138.0]),
                              0.4842548072338104, 115, 0.5399812459945679, 121, 0, 255)
    assert float(got[0]) == 215.0


class MBBlock(nn.Module):
    """Expand 1x1 - ReLU6 - depthwise 3x3 - ReLU6 - project 1x1, BN after each conv, + input."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project, self.bn3 = nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c)
        self.act1, self.act2 = nn.ReLU6(), nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.bn2(self.dw(self.act1(self.bn1(self.expand(x))))))
        return self.bn3(self.project(y)) + x


class MBNet(nn.Module):
    """Stem (stride 2) - two residual blocks (depthwise on 32 and on 24 channels: ONNX Runtime's
    symmetric depthwise kernel and its fallback) - head 1x1 - ReLU6 - global average pool - fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(MBBlock(16, 32), MBBlock(16, 24))
        self.head = nn.Sequential(nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))


def _mbnet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = MBNet()
    g = torch.Generator().manual_seed(seed + 100)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return model.eval()


@pytest.mark.parametrize("seed,w_symmetric", [(0, None), (1, None), (2, False)])
def test_onnxruntime_matches_simulation_within_one_lsb(seed, w_symmetric, tmp_path):
    x = torch.randn(512, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    recipe = ptqkit.Recipe(a_bits=8, **ort_safe(8, w_symmetric=w_symmetric, w_range="minmax",
                                                a_range="minmax")).with_steps("int_outputs")
    qmodel = ptqkit.quantize(_mbnet(seed), x[:32], recipe)
    export_onnx(qmodel, tmp_path / "m.onnx", x[:1])
    ops = optimized_op_counts(tmp_path / "m.onnx", tmp_path)
    assert ops["QLinearConv"] == 8 and ops["QLinearAdd"] == 2 and ops["QGemm"] == 1
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["Conv"] == ops["Add"] == 0
    with torch.no_grad():
        sim = qmodel(x)
        with integer.float_simulation():
            flt = qmodel(x)
    out = torch.from_numpy(ort_load(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0])
    fc = quant_layers(qmodel)["fc"]
    lsb = fc.a_quant.qparams()[0] * fc.w_quant.qparams()[0]  # (10,): the int32 accumulator step
    assert bool(((out - sim).abs() <= lsb).all()), float(((out - sim).abs() / lsb).max())
    # the float simulation does not get there: a few near-half-step flips spread to the logits
    assert float(((out - flt).abs() / lsb).max()) > 1


def test_integer_plan_comes_back_after_load(tmp_path):
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    recipe = ptqkit.Recipe(w_range="minmax", a_range="minmax").with_steps("int_outputs")
    qmodel = ptqkit.quantize(_mbnet(3), x, recipe)
    ptqkit.save(qmodel, tmp_path / "q.safetensors")
    loaded = ptqkit.load(tmp_path / "q.safetensors", MBNet)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), qmodel(x), rtol=0, atol=0)
    assert getattr(loaded.get_submodule("blocks.0"), "_int_add", None) is not None
