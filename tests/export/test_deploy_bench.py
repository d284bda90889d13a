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


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = y + torch.relu(self.conv2(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _suite():  # type: ignore[no-untyped-def]
    from ptqkit.bench import Suite
    from ptqkit.calib.data import CalibrationData

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 3, 8, 8, generator=g), torch.randint(0, 10, (40,), generator=g)
    return Suite("tiny", _Net().eval(), x, y, lambda n, seed: CalibrationData(x[:n].split(8)))


VNNI = {"model": "Test CPU", "x86": True, "vnni": ["avx512_vnni"]}
NO_VNNI = {"model": "Old CPU", "x86": True, "vnni": []}


def test_deploy_recipe_is_the_default_recipe_plus_int_outputs_where_vnni():
    from ptqkit.bench import BenchConfig
    from ptqkit.export.deploy_bench import deploy_recipe
    from ptqkit.pipeline import Recipe

    cfg = BenchConfig(w_bits=8, a_bits=8, calib_size=16)
    r = deploy_recipe(_suite(), cfg, cpu=VNNI)
    default = Recipe()
    assert (r.w_bits, r.a_bits, r.w_symmetric, r.w_range, r.a_range, r.first_last_8bit) == (
        8, 8, default.w_symmetric, "mse", "mse", True)
    assert [s.name for s in r.steps] == ["int_outputs"] and not r.overrides
    old = deploy_recipe(_suite(), cfg, cpu=NO_VNNI)  # saturating int16 pair sums: 7-bit weights
    assert (old.w_bits, old.w_symmetric, old.first_last_8bit) == (7, True, False)
    assert old.overrides == {"conv1": (7, 8), "fc": (7, 8)}
    assert deploy_recipe(_suite(), BenchConfig(w_bits=4, a_bits=8), cpu=NO_VNNI).w_bits == 4


@pytest.mark.parametrize("w_bits", [8, 4])
def test_deploy_row_reports_cpu_closeness_to_float_and_b1_b32(monkeypatch, w_bits):
    import ptqkit.export.deploy_bench as db
    from ptqkit.bench import BenchConfig

    monkeypatch.setattr(db, "cpu_info", lambda: VNNI)
    suite, cfg = _suite(), BenchConfig(w_bits=w_bits, a_bits=8, calib_size=16)
    spec = LatencySpec(threads=1, batches=(1, 32), warmup=0, repeats=1)
    row = db.deploy_row(suite, cfg, db.deploy_recipe(suite, cfg, cpu=VNNI), spec)
    assert row["cpu"] == {"model": "Test CPU", "vnni": ["avx512_vnni"]} and row["reduce_range"] is False
    for tag in ("ours", "ort", "sim"):
        assert 0 <= row[f"{tag}_vs_float_agreement"] <= 100 and row[f"{tag}_vs_float_kl"] >= 0
    assert row["agreement"] == row["ours_vs_float_agreement"] and row["kl"] == row["ours_vs_float_kl"]
    assert row["ours_vs_float_agreement"] > 50 and row["ort_vs_float_agreement"] > 50
    for tag in ("float", "ort", "ours"):
        assert row[f"{tag}_latency_b1_ms"] > 0 and row[f"{tag}_latency_b32_ms"] > 0
    assert row["float_layers"] == [] and row["ours_kernels"]["float_kernels"] == 0
    # inner layers at w_bits in int8 containers (4-bit values at W4), first / last at 8 bits
    assert row["weight_containers"] == ({"int8 (8-bit)": 3} if w_bits == 8
                                        else {"int8 (4-bit)": 1, "int8 (8-bit)": 2})
    assert 0 < row["packed_bytes"] and "packed_over_float" in row and row["seconds"] > 0
    table = db.deploy_markdown([{"suite": "tiny", "w_bits": w_bits, "a_bits": 8, **row}])
    assert "b32 ms" in table and "Test CPU (avx512_vnni)" in table
    assert len(table.splitlines()) == 5 and table.count("ptqkit") == 1
    ours = table.splitlines()[-1].split("|")
    assert ours[10].strip() == f"{row['packed_bytes'] / 1024:.0f}"  # packed KB beside the ONNX KB


def test_deploy_recipe_of_a_named_method_keeps_its_ranges_and_steps():
    from ptqkit.bench import METHODS, BenchConfig
    from ptqkit.export.deploy_bench import deploy_recipe

    cfg = BenchConfig(w_bits=8, a_bits=8, calib_size=16)
    base = METHODS["aciq+bc"](cfg)
    r = deploy_recipe(_suite(), cfg, cpu=VNNI, base=base)
    assert (r.w_range, r.a_range, r.w_symmetric) == (base.w_range, base.a_range, base.w_symmetric)
    assert [s.name for s in r.steps] == [s.name for s in base.steps] + ["int_outputs"]
    old = deploy_recipe(_suite(), cfg, cpu=NO_VNNI, base=base)
    assert (old.w_bits, old.w_symmetric, old.w_range) == (7, True, base.w_range)
    assert [s.name for s in old.steps] == [s.name for s in r.steps]


def test_bench_deploy_prefix_runs_the_deploy_row_of_that_method(monkeypatch):
    import ptqkit.bench as bench
    import ptqkit.export.deploy_bench as db

    seen = []
    monkeypatch.setattr(db, "deploy_row", lambda suite, cfg, recipe, spec: (
        seen.append(recipe), {"method": "deploy (label)", "agreement": 1.0})[1])
    cfg = bench.BenchConfig(w_bits=8, a_bits=8, calib_size=16)
    row = bench.run_method(_suite(), "deploy:percentile", cfg)
    assert row["method"] == "deploy:percentile (label)"
    assert seen[0].w_range == "percentile" and seen[0].steps[-1].name == "int_outputs"
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        bench.run_bench("fmnist-resnet20", ["deploy:nope"], cfg)
