"""Peer runners: rows with the bench's keys, the float model untouched, failures as rows."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from ptqkit.bench import RUNNERS, BenchConfig
from ptqkit.calib.data import CalibrationData
from ptqkit.evaluate import evaluate
from ptqkit.peers import PEER_RUNNERS, _guarded


@dataclass
class TinySuite:
    float_model: nn.Module
    x: torch.Tensor = field(default_factory=lambda: torch.randn(
        64, 3, 16, 16, generator=torch.Generator().manual_seed(1)))

    def calib(self, n: int, seed: int) -> CalibrationData:
        return CalibrationData(self.x[:n].split(16))

    def evaluate(self, model: nn.Module) -> dict:
        return evaluate(model, self.float_model, self.x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def test_peers_are_bench_runners() -> None:
    assert {"nncf", "brevitas"} <= set(RUNNERS)


def test_nncf_refuses_bits_it_cannot_honour() -> None:
    row = PEER_RUNNERS["nncf"](TinySuite(_model()), BenchConfig(w_bits=4, a_bits=8, calib_size=32))
    assert row["quant_top1"] is None and "8-bit only" in row["error"]


def test_a_failing_peer_is_a_row_not_a_crash() -> None:
    def boom(suite, cfg):  # type: ignore[no-untyped-def]
        raise RuntimeError("no such graph\nsecond line")
    row = _guarded("torch", boom)(None, None)
    assert row["error"] == "torch failed: RuntimeError: no such graph" and row["agreement"] is None


@pytest.mark.peers
@pytest.mark.slow
def test_brevitas_row_keeps_the_float_model() -> None:
    pytest.importorskip("brevitas_examples")
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    row = PEER_RUNNERS["brevitas"](TinySuite(model), BenchConfig(w_bits=8, a_bits=8, calib_size=32))
    assert "error" not in row, row.get("error")
    assert 0 <= row["agreement"] <= 100 and row["kl"] >= 0 and row["recipe"]["weight_bit_width"] == 8
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


class _PaddedConv(nn.Conv2d):
    """A conv subclass with its own forward, as in the EfficientNet packages."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


@pytest.mark.peers
@pytest.mark.slow
def test_brevitas_row_states_its_coverage_and_refuses_a_mostly_float_model() -> None:
    pytest.importorskip("brevitas_examples")
    cfg = BenchConfig(w_bits=8, a_bits=8, calib_size=32)
    plain = PEER_RUNNERS["brevitas"](TinySuite(_model()), cfg)
    assert plain["mac_coverage"] == pytest.approx(1.0)
    torch.manual_seed(0)
    custom = nn.Sequential(_PaddedConv(3, 8, 3), nn.ReLU(), _PaddedConv(8, 8, 3), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    row = PEER_RUNNERS["brevitas"](TinySuite(custom), cfg)
    assert row["mac_coverage"] < 0.1 and row["agreement"] is None and row["error"].startswith("refused")
    shown = PEER_RUNNERS["brevitas"](TinySuite(custom), BenchConfig(w_bits=8, a_bits=8, calib_size=32,
                                                                    allow_low_coverage=True))
    assert shown["mac_coverage"] < 0.1 and shown["agreement"] is not None
