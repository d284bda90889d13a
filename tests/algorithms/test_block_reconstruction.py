from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptqkit.algorithms import block_reconstruction as br
from ptqkit.algorithms.block_reconstruction import BlockReconstructionOptions, find_blocks
from ptqkit.calib.data import CalibrationData
from ptqkit.nn.modules import quant_layers
from ptqkit.pipeline import Recipe, StepSpec, quantize


class Units(nn.Module):
    """stem -> (a0 -> a1) chain unit -> residual unit (r0 -> r1, skip) -> head; the size of the
    input is read at the start and used at the end (as EfficientNet's ``view(bs, -1)`` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(),
                               nn.Conv2d(8, 12, 1), nn.ReLU())
        self.r = nn.Sequential(nn.Conv2d(12, 12, 1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1))
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs = x.size(0)
        y = torch.relu(self.stem(x))
        y = self.a(y)
        y = y + self.r(y)
        return self.fc(y.mean((2, 3)).view(bs, -1))


class Untraceable(Units):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 1e9:  # data-dependent control flow: fx cannot trace it
            return x
        return super().forward(x)


def _data(n: int = 48, seed: int = 4) -> CalibrationData:
    # inputs of std 10: activations of the size a trained network's have (the rounding
    # regulariser's weight is absolute, as in BRECQ)
    x = 10 * torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return CalibrationData(list(x.split(16)))


pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"w_range": "minmax", "a_range": "minmax", "first_last_8bit": False}


def _prepared(model: nn.Module, bits: int = 4) -> nn.Module:
    return quantize(model.eval(), _data(), Recipe(w_bits=bits, a_bits=bits, **FAST))


def test_blocks_follow_units_and_keep_first_and_last_alone() -> None:
    q = _prepared(Units())
    blocks, graph = find_blocks(q, torch.randn(1, 1, 8, 8), list(quant_layers(q)), max_layers=4)
    assert graph is not None
    assert [b.layers for b in blocks] == [["stem"], ["a.0", "a.2"], ["r.0", "r.2"], ["fc"]]
    # the residual unit runs on to the head's input, view(bs, -1) included: it reads bs
    assert [b.uses_extras for b in blocks] == [False, False, True, False]
    small, _ = find_blocks(q, torch.randn(1, 1, 8, 8), list(quant_layers(q)), max_layers=1)
    # a residual unit cannot be cut: it stays one block whatever max_layers says
    assert [b.layers for b in small] == [["stem"], ["a.0"], ["a.2"], ["r.0", "r.2"], ["fc"]]


def test_untraceable_model_falls_back_to_layer_blocks() -> None:
    q = _prepared(Untraceable())
    blocks, graph = find_blocks(q, torch.randn(1, 1, 8, 8), list(quant_layers(q)), max_layers=4)
    assert graph is None and [b.layers for b in blocks] == [[n] for n in quant_layers(q)]
    out = quantize(Untraceable().eval(), _data(), Recipe(
        w_bits=4, a_bits=4, **FAST,
        steps=[StepSpec("block_reconstruction", {"iters": 5, "batch_size": 8})]))
    summary = _summary(out)
    assert summary["graph_blocks"] is False and summary["blocks"] == len(quant_layers(out))


def _summary(q: nn.Module) -> dict[str, object]:
    return next(s for s in q.report.steps if s["step"] == "block_reconstruction")  # type: ignore


def _run_step(model: nn.Module, calib: CalibrationData, **opts: object) -> nn.Module:
    return quantize(model, calib, Recipe(w_bits=4, a_bits=4, **FAST,
                                         steps=[StepSpec("block_reconstruction", opts)]))


def _out_mse(model: nn.Module, q: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - q(x)).pow(2).mean())


def test_step_brings_held_out_outputs_closer_to_float_and_leaves_weights_on_the_grid() -> None:
    torch.manual_seed(0)
    model, calib = Units().eval(), _data(64)
    nearest = _prepared(model)
    q = _run_step(model, calib, iters=80, batch_size=16)
    summary = _summary(q)
    assert summary["step"] == "block_reconstruction" and summary["blocks"] == 4
    assert summary["mse_after_sum"] <= summary["mse_before_sum"]
    held_out = 10 * torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    assert _out_mse(model, q, held_out) < 0.85 * _out_mse(model, nearest, held_out)
    near = quant_layers(nearest)
    kept = 0
    for name, layer in quant_layers(q).items():
        info = q.report.layers[name]["block_reconstruction"]  # type: ignore[union-attr]
        assert info["mse_after"] <= info["mse_before"]
        if not info["kept"]:  # undone: the layer is exactly the round-to-nearest start
            assert torch.equal(layer.weight, near[name].weight), name
            continue
        kept += 1
        scale, _ = layer.w_quant.qparams()
        codes = layer.weight.detach() / scale.reshape(-1, *[1] * (layer.weight.dim() - 1))
        assert torch.allclose(codes, codes.round(), atol=1e-3), name  # hard-rounded: on the grid
    assert kept >= 3


def test_reported_block_mse_is_what_the_written_model_computes() -> None:
    """The hard-rounded iterate measured inside the fit is the one written into the layers."""
    q = _prepared(Units())
    layers = quant_layers(q)
    lin = layers["fc"]
    g = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(40, 12, generator=g))
    with torch.no_grad():
        y = lin.op(x, lin.weight, lin.bias) + 0.01 * torch.randn(40, 5, generator=g)
    from ptqkit.calib.cache import ActivationCache

    xs, ys = ActivationCache(), ActivationCache()
    for a, b in zip(x.split(20), y.split(20)):
        xs.append(a)
        ys.append(b)
    stats = br.reconstruct_block([lin], lambda t, i: lin(t), xs, ys,
                                 BlockReconstructionOptions(iters=60, batch_size=20),
                                 torch.Generator().manual_seed(0))
    with torch.no_grad():
        measured = float(((lin(x) - y) ** 2).sum(1).mean())
    assert measured == pytest.approx(stats["mse_after"], rel=1e-5)
    assert stats["mse_after"] <= stats["mse_before"]


def test_nearest_rounding_keeps_the_round_to_nearest_codes() -> None:
    model, calib = Units().eval(), _data()
    q = _run_step(model, calib, iters=10, drop_prob=0.0, rounding="nearest", lr_w_scale=0.0)
    s = _summary(q)
    assert s["drop_prob"] == 0.0 and s["rounding"] == "nearest"
    nearest = quant_layers(_prepared(model))
    for name, layer in quant_layers(q).items():
        ref = nearest[name]
        assert torch.equal(layer.w_quant.int_repr(layer.weight), ref.w_quant.int_repr(ref.weight)), name


@pytest.mark.parametrize("bad", [{"rounding": "stochastic"}, {"drop_prob": 1.5}, {"iters": -1},
                                 {"max_layers": 0}, {"beta_start": 1.0, "beta_end": 2.0}])
def test_bad_options_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        BlockReconstructionOptions(**bad)  # type: ignore[arg-type]


def test_interrupt_leaves_the_user_model_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Units().eval()
    before = copy.deepcopy(model.state_dict())
    calls = {"n": 0}
    real = br.reconstruct_block

    def stop_after_one(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(br, "reconstruct_block", stop_after_one)
    with pytest.raises(KeyboardInterrupt, match="after 1 of 4 blocks"):
        _run_step(model, _data(32), iters=3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("model_cls", [Units, Untraceable])
def test_block_caches_together_stay_within_the_memory_budget(
        monkeypatch: pytest.MonkeyPatch, model_cls: type[nn.Module]) -> None:
    """The caches alive at once hold at most memory_budget_mb in memory together; the rest
    spills to disk, and the result is the same as with everything in memory."""
    live: list[br.ActivationCache] = []
    peak = {"memory": 0, "disk": 0}

    class Spy(br.ActivationCache):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            live.append(self)

        def append(self, *tensors: torch.Tensor) -> None:
            super().append(*tensors)
            peak["memory"] = max(peak["memory"], sum(c.memory_bytes for c in live))
            peak["disk"] = max(peak["disk"], self.disk_bytes)

    budget_mb = 0.02  # the 48-sample inputs (12 KB per cache) do not all fit
    torch.manual_seed(0)
    roomy = _run_step(model_cls().eval(), _data(), iters=5, batch_size=16)
    monkeypatch.setattr(br, "ActivationCache", Spy)
    torch.manual_seed(0)
    tight = _run_step(model_cls().eval(), _data(), iters=5, batch_size=16,
                      memory_budget_mb=budget_mb)
    assert 0 < peak["memory"] <= budget_mb * (1 << 20)
    assert peak["disk"] > 0
    for name, layer in quant_layers(tight).items():
        assert torch.equal(layer.weight, quant_layers(roomy)[name].weight), name
