from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from ptqkit import bench, cli, sweep
from ptqkit.algorithms.bn_tuning import BNTuning, BNTuningOptions
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


class LateDefined(nn.Module):
    """Modules defined in another order than they run (like a ResNet downsample): the table must
    follow the execution order, or a reloaded table does not line up and is measured again."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.down = nn.Conv2d(1, 8, 1)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x)) + self.down(x)
        return self.fc(y.mean((2, 3)))


@pytest.fixture
def late_suite(tiny_data, monkeypatch) -> str:
    model = LateDefined().eval()
    with torch.no_grad():
        y = model(tiny_data).argmax(1)
    monkeypatch.setitem(bench.SUITES, "late", lambda cfg: bench.Suite(
        "late", model, tiny_data, y, lambda n, seed: CalibrationData(tiny_data, limit=n)))
    return "late"


def test_sweep_reuses_saved_table(late_suite: str, tmp_path, monkeypatch) -> None:
    from ptqkit.algorithms import mixed_precision

    cfg = sweep.SweepConfig(compressions=(0.15, 0.1), methods=("ip", "greedy-accuracy"),
                            candidates="w8a8,w4a4,w2a2", first_last_8bit=False, calib_size=64,
                            table_dir=str(tmp_path))
    first = sweep.run_sweep(late_suite, cfg)
    assert first[0]["table"]["layers"] == ["conv1", "down", "fc"]  # execution order
    assert (tmp_path / "late-ranges.states.pt").is_file()

    def fail(*args: object, **kw: object) -> None:
        pytest.fail("the saved table was measured or tuned again")

    monkeypatch.setattr(mixed_precision, "measure_table", fail)
    monkeypatch.setattr(sweep.Planner, "_tune", fail)
    again = sweep.run_sweep(late_suite, cfg)
    for a, b in zip(first[1:], again[1:]):
        assert (a["method"], a["bits"], a["quant_top1"]) == (b["method"], b["bits"], b["quant_top1"])
        assert a["measured_calib_loss"] == b["measured_calib_loss"]
    # other settings: the table does not fit and is measured again (here: fails loudly)
    with pytest.raises(pytest.fail.Exception):
        sweep.run_sweep(late_suite, dataclasses.replace(cfg, seed=1))


def test_sweep_resumes_from_its_json(tiny_suite: str, tmp_path, monkeypatch) -> None:
    out = tmp_path / "rows.json"
    argv = ["sweep", "--suite", tiny_suite, "--compressions", "0.2,0.15", "--methods", "ip",
            "--calib-size", "32", "--json", str(out)]
    assert cli.main(argv[:4] + ["0.2"] + argv[5:]) == 0
    assert [r.get("budget") for r in json.loads(out.read_text())] == [None, 0.2]
    calls: list[float] = []
    real = sweep._point
    monkeypatch.setattr(sweep, "_point", lambda *a: calls.append(a[4]) or real(*a))
    assert cli.main(argv) == 0  # only 0.15 is new
    assert calls == [0.15]
    rows = json.loads(out.read_text())
    assert [(r["method"], r.get("budget")) for r in rows] == [("table:ranges", None), ("ip", 0.2),
                                                          ("ip", 0.15)]
    monkeypatch.setattr(sweep, "_base_model", lambda *a: pytest.fail("nothing left to do"))
    assert cli.main(argv) == 0 and len(json.loads(out.read_text())) == 3
    assert not list(tmp_path.glob("*.tmp"))
    assert cli.main(argv + ["--report-only", "--plot", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").is_file()


def test_advanced_adaquant_once_per_suite(tiny_suite: str, tmp_path, monkeypatch) -> None:
    """Parallel AdaQuant per (layer, candidate bits) runs while the table is measured, once per
    suite; every compression after that stitches the cached results."""
    from ptqkit.algorithms import adaquant

    calls: list[int] = []
    real = adaquant.adaquant_layer
    monkeypatch.setattr(adaquant, "adaquant_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = sweep.SweepConfig(compressions=(0.25, 0.15, 0.1), methods=("advanced",),
                            candidates="w8a8,w4a4,w2a2", first_last_8bit=False, calib_size=32,
                            tuner_options={"adaquant": {"iters": 2, "eval_every": 1}})
    rows = sweep.run_sweep(tiny_suite, cfg)
    assert len(calls) == 3 * 3  # 3 layers x 3 candidates, not once more per compression
    pts = [r for r in rows if r["method"] == "advanced"]
    assert [r["post"] for r in pts] == [["bn_tuning", "bias_tuning"]] * 3
    assert all(r["compression"] <= r["budget"] + 1e-12 for r in pts)
    assert all(r["quant_top1"] is not None for r in pts)


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


def test_base_ranges_do_not_matter(tiny_suite: str, monkeypatch) -> None:
    """The sweep prepares its base with cheap min-max ranges: every point stitches a tuned state
    into every layer, so MSE ranges on the base give the same rows."""
    from ptqkit.pipeline import quantize

    cfg = sweep.SweepConfig(compressions=(0.2, 0.1), methods=("ip", "greedy-accuracy"),
                            candidates="w8a8,w4a4,w2a2", first_last_8bit=False, calib_size=64)
    fast = sweep.run_sweep(tiny_suite, cfg)
    monkeypatch.setattr(sweep, "_base_model", lambda suite, calib, cfg: quantize(
        suite.float_model, calib, Recipe(first_last_8bit=False), forward_fn=suite.forward_fn))
    for a, b in zip(fast[1:], sweep.run_sweep(tiny_suite, cfg)[1:]):
        keys = ("bits", "measured_calib_loss", "kl")
        assert [a[k] for k in keys] == [b[k] for k in keys]


@dataclasses.dataclass(frozen=True)
class _PaperBNTOptions(BNTuningOptions):
    target: str = "bn"
    guard: bool = False


class _PaperBNT(BNTuning):
    Options = _PaperBNTOptions


def test_post_guard_undoes_a_step_that_hurts(tiny_suite: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the tiny model the paper's unguarded BN re-estimation raises the calibration KL (its
    calibration data do not match the BN statistics): without the sweep's post guard light keeps
    it, with the guard light is ip. (ptqkit's default BN tuning guards itself.)"""
    monkeypatch.setitem(sweep.STEPS, "bn_tuning", _PaperBNT)
    cfg = sweep.SweepConfig(compressions=(0.15,), methods=("ip", "light"), candidates="w8a8,w4a4,w2a2",
                            first_last_8bit=False, calib_size=64)
    plain = {r["method"]: r for r in sweep.run_sweep(tiny_suite, cfg)}
    assert plain["light"]["post"] == ["bn_tuning"]
    assert plain["light"]["calib_loss_after_post"] > plain["light"]["measured_calib_loss"]
    guarded = {r["method"]: r for r in sweep.run_sweep(tiny_suite, dataclasses.replace(cfg, post_guard=True))}
    light, ip_row = guarded["light"], guarded["ip"]
    assert light["post"] == [] and light["post_steps"][0]["kept"] is False
    assert (light["kl"], light["calib_loss_after_post"]) == (ip_row["kl"], ip_row["measured_calib_loss"])


def test_sweep_refinement_rows(tiny_suite: str, tmp_path) -> None:
    """--refine-rounds: the IP methods refine in context (greedy rows do not); each row keeps the
    rounds, its measured loss is the refined one and never above the unrefined IP's."""
    from ptqkit.algorithms.mixed_precision import RefineOptions

    base = sweep.SweepConfig(compressions=(0.1,), methods=("ip", "light", "greedy-accuracy"),
                             candidates="w8a8,w4a4,w2a2", first_last_8bit=False, calib_size=64,
                             refine=RefineOptions(rounds=0))
    plain = {(r["method"], r.get("budget")): r for r in sweep.run_sweep(tiny_suite, base)}
    cfg = dataclasses.replace(base, refine=RefineOptions(rounds=2, samples=32, neighbours="all"))
    rows = {(r["method"], r.get("budget")): r for r in sweep.run_sweep(tiny_suite, cfg)}
    for c in (0.1,):
        ip_row, light = rows[("ip", c)], rows[("light", c)]
        assert ip_row["refine"][0]["measured_loss"] == plain[("ip", c)]["measured_calib_loss"]
        assert ip_row["measured_calib_loss"] == ip_row["refine"][-1]["measured_loss"]
        assert ip_row["measured_calib_loss"] <= plain[("ip", c)]["measured_calib_loss"]
        assert ip_row["compression"] <= c and ip_row["refine_options"]["rounds"] == 2
        assert light["bits"] == ip_row["bits"]  # light stitches the refined IP choice
        assert rows[("greedy-accuracy", c)]["refine"] == []
    out = tmp_path / "rows.json"
    assert cli.main(["sweep", "--suite", tiny_suite, "--compressions", "0.15", "--methods", "ip",
                     "--calib-size", "32", "--refine-rounds", "1", "--refine-samples", "0",
                     "--no-first-last-8bit",
                     "--json", str(out)]) == 0
    row = json.loads(out.read_text())[1]
    assert row["refine_options"] == {"rounds": 1, "samples": None, "neighbours": "adjacent",
                                     "backtracks": 2} and len(row["refine"]) == 2
