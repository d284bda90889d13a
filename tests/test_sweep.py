from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ptqkit import bench, cli, sweep
from ptqkit.calib.data import CalibrationData
from ptqkit.pipeline import Recipe, StepSpec


@pytest.fixture
def tiny_suite(tiny: nn.Module, tiny_data, monkeypatch) -> str:
    with torch.no_grad():
        y = tiny(tiny_data).argmax(1)
    monkeypatch.setitem(bench.SUITES, "tiny", lambda cfg: bench.Suite(
        "tiny", tiny, tiny_data, y, lambda n, seed: CalibrationData(tiny_data, limit=n)))
    return "tiny"


def test_sweep_rows_and_plot(tiny_suite: str, tmp_path) -> None:
    cfg = sweep.SweepConfig(compressions=(0.25, 0.15, 0.05), methods=("greedy-accuracy", "ip",
                            "greedy-compression"), candidates="w8a8,w4a4,w2a2",
                            first_last_8bit=False, calib_size=64, table_dir=str(tmp_path))
    rows = sweep.run_sweep(tiny_suite, cfg)
    assert rows[0]["method"] == "table:ranges" and (tmp_path / "tiny-ranges.json").is_file()
    pts = {(r["method"], r["budget"]): r for r in rows[1:]}
    assert len(pts) == 9
    assert "smallest feasible compression" in pts[("ip", 0.05)]["error"]
    assert pts[("ip", 0.05)]["smallest_feasible"] == pytest.approx(0.0625)
    for c in (0.25, 0.15):
        ip_row = pts[("ip", c)]
        assert ip_row["compression"] <= c and ip_row["fp32_top1"] == 100.0
        # the IP optimum (alternative 0) predicts no more loss than either greedy choice; the
        # row keeps the alternative with the lowest measured calibration loss
        ip_best = ip_row["alternatives"][0]["predicted_loss"] if ip_row["alternatives"] else \
            ip_row["expected_calib_loss"]
        for g in ("greedy-accuracy", "greedy-compression"):
            assert ip_best <= pts[(g, c)]["expected_calib_loss"] + 1e-12
        if ip_row["alternatives"]:
            measured = [a["measured_loss"] for a in ip_row["alternatives"]]
            assert ip_row["measured_calib_loss"] == min(measured)
    assert set(pts[("ip", 0.25)]["bits"].values()) == {"w8a8"}
    sweep.plot_curves(rows, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_sweep_reuses_saved_table(tiny_suite: str, tmp_path, monkeypatch) -> None:
    cfg = sweep.SweepConfig(compressions=(0.15,), methods=("ip",), candidates="w8a8,w4a4,w2a2",
                            first_last_8bit=False, calib_size=64, table_dir=str(tmp_path))
    first = sweep.run_sweep(tiny_suite, cfg)
    monkeypatch.setattr(sweep.Session, "measure", lambda *a: pytest.fail("table re-measured"))
    again = sweep.run_sweep(tiny_suite, cfg)
    assert again[1]["bits"] == first[1]["bits"]
    assert again[1]["quant_top1"] == first[1]["quant_top1"]


def test_sweep_cli_and_bad_input(tiny_suite: str, tmp_path, capsys) -> None:
    out = tmp_path / "rows.json"
    rc = cli.main(["sweep", "--suite", tiny_suite, "--compressions", "0.2", "--methods", "ip",
                   "--calib-size", "32", "--json", str(out)])
    assert rc == 0 and json.loads(out.read_text())[1]["method"] == "ip"
    assert cli.main(["sweep", "--suite", tiny_suite, "--compressions", "1.5"]) == 2
    assert "(0, 1]" in capsys.readouterr().err
    assert cli.main(["sweep", "--suite", tiny_suite, "--methods", "nope"]) == 2
    assert cli.main(["sweep", "--suite", tiny_suite, "--candidates", ""]) == 2
    assert "candidate set is empty" in capsys.readouterr().err


def test_with_mixed_precision_replaces_budget() -> None:
    r = Recipe().with_steps(StepSpec("mixed_precision", {"compression": 0.13}))
    r2 = sweep.with_mixed_precision(r, max_drop=1.0)
    assert dict(r2.steps[0].options) == {"max_drop": 1.0}
    with pytest.raises(ValueError, match="no mixed_precision step"):
        sweep.with_mixed_precision(Recipe(), compression=0.2)
