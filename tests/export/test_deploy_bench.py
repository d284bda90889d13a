"""Deployment benchmark helpers: interleaved latency protocol (no timing assertions)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime")
from ptqkit.export.deploy_bench import (  # noqa: E402
    INT_KERNELS,
    LatencySpec,
    export_float,
    interleaved_latency_ms,
)


def test_interleaved_latency_reports_every_model_and_batch(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).eval()
    x = torch.randn(4, 1, 4, 4)
    paths = {t: export_float(model, tmp_path / f"{t}.onnx", x[:1]) for t in ("a", "b")}
    import ptqkit.export.deploy_bench as db

    calls = []
    real = db.ort_load

    def planner(path, threads):  # type: ignore[no-untyped-def]
        sess = real(path, threads)
        run = sess.run

        class Spy:
            def run(self, out, feed):  # type: ignore[no-untyped-def]
                calls.append((path.stem, len(feed["input"])))
                return run(out, feed)
        return Spy()

    monkeypatch.setattr(db, "ort_load", planner)
    res = interleaved_latency_ms(paths, x, LatencySpec(threads=1, batches=(1, 4), warmup=1, repeats=3))
    assert set(res) == {"a", "b"} and all(set(v) == {"latency_b1_ms", "latency_b4_ms"} for v in res.values())
    assert all(v > 0 for r in res.values() for v in r.values())
    timed = calls[4:]  # after 1 warm-up per model and batch size
    # round-robin (not one model after the other), the order rotating from repeat to repeat
    assert timed[:8] == [("a", 1), ("b", 1), ("a", 4), ("b", 4), ("b", 1), ("a", 1), ("b", 4), ("a", 4)]
    assert len(timed) == 3 * 4


def test_int_kernels_cover_adds_and_pooling():
    assert {"QLinearAdd", "QLinearGlobalAveragePool", "QLinearConv", "QGemm"} <= set(INT_KERNELS)


def test_ort_histogram_calibration_is_fed_one_batch_per_call(tmp_path, monkeypatch):
    """ORT's histogram calibrators hold every batch they are given at once; ort_quantize must hand
    them one batch per collect_data call so that memory does not grow with the calibration set."""
    from onnxruntime.quantization import calibrate

    from ptqkit.calib.data import CalibrationData
    from ptqkit.export.deploy_bench import ort_predict, ort_quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    x = torch.randn(20, 3, 8, 8)
    calls: list[int] = []
    original = calibrate.HistogramCalibrater.collect_data

    def counting(self, reader):
        batches = []
        while (item := reader.get_next()) is not None:
            batches.append(item)
        calls.append(len(batches))
        return original(self, _List(batches))

    class _List:
        def __init__(self, items):
            self._it = iter(items)

        def get_next(self):
            return next(self._it, None)

    monkeypatch.setattr(calibrate.HistogramCalibrater, "collect_data", counting)
    fp = export_float(model, tmp_path / "f.onnx", x[:1])
    out = ort_quantize(fp, tmp_path / "q.onnx", CalibrationData(x.split(4)), method="Entropy")
    assert calls == [1, 1, 1, 1, 1]
    with torch.no_grad():
        ref = model(x)
    got = ort_predict(out, x)
    assert got.shape == ref.shape
    assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.99
