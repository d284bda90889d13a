from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ptqkit import bench
from ptqkit.bench import METHODS, BenchConfig, Suite, calib_size_study, merge_study, study_summary
from ptqkit.calib.data import CalibrationData


def _tiny_suite(model: nn.Module, calls: list[tuple[int, int]]) -> Suite:
    g = torch.Generator().manual_seed(5)
    pool = torch.randn(40, 1, 8, 8, generator=g)
    x_test = torch.randn(30, 1, 8, 8, generator=g)
    with torch.no_grad():
        y_test = model(x_test).argmax(1)

    def make_calib(n: int, seed: int) -> CalibrationData:
        calls.append((n, seed))
        idx = torch.randperm(40, generator=torch.Generator().manual_seed(seed))[:n]
        return CalibrationData(pool[idx], batch_size=10)

    return Suite("tiny", model, x_test, y_test, make_calib)


def test_study_draws_new_calibration_images_per_seed(tiny: nn.Module, one_thread: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []
    suite = _tiny_suite(tiny, calls)
    monkeypatch.setitem(bench.SUITES, "tiny", lambda cfg: suite)
    rows = calib_size_study("tiny", ["minmax"], [1, 4], 3, BenchConfig(w_bits=4, a_bits=4))
    assert sorted(calls) == [(n, s) for n in (1, 4) for s in range(3)]
    assert [(r["calib_size"], r["seed"]) for r in rows] == [(n, s) for n in (1, 4) for s in range(3)]
    one_image = [suite.calib(1, s).batches[0] for s in range(3)]
    assert not torch.equal(one_image[0], one_image[1]) and not torch.equal(one_image[1], one_image[2])
    assert all(r["recipe"]["seed"] == r["seed"] for r in rows)


def _row(method: str, size: int, seed: int, top: float) -> dict[str, Any]:
    return {"suite": "s", "method": method, "calib_size": size, "seed": seed, "quant_top1": top,
            "fp32_top1": 90.0, "w_bits": 4, "a_bits": 4}


def test_summary_mean_std_by_hand() -> None:
    rows = [_row("a", 1, s, t) for s, t in enumerate((80.0, 82.0, 84.0))] + [_row("b", 1, 0, 70.0)]
    summary = study_summary(rows)
    a = next(r for r in summary if r["method"] == "a")
    assert a["top1_mean"] == pytest.approx(82.0) and a["top1_std"] == pytest.approx(2.0)
    assert a["seeds"] == 3 and a["top1_per_seed"] == {0: 80.0, 1: 82.0, 2: 84.0}
    b = next(r for r in summary if r["method"] == "b")
    assert b["top1_std"] == 0.0


def test_merge_study_joins_job_files_and_rejects_duplicates(tmp_path: Path) -> None:
    one = [_row("a", 1, 0, 80.0), _row("a", 1, 1, 82.0), {"summary": []}]
    two = [_row("a", 10, 0, 85.0)]
    (tmp_path / "one.json").write_text(json.dumps(one))
    (tmp_path / "two.json").write_text(json.dumps(two))
    rows = merge_study([tmp_path / "one.json", tmp_path / "two.json"])
    assert [(r["calib_size"], r["seed"]) for r in rows] == [(1, 0), (1, 1), (10, 0)]
    assert [r["top1_mean"] for r in study_summary(rows)] == pytest.approx([81.0, 85.0])
    with pytest.raises(ValueError, match="already came from another file"):
        merge_study([tmp_path / "one.json", tmp_path / "one.json"])


def test_plotting_without_matplotlib_is_a_one_line_error(monkeypatch) -> None:
    import importlib.util

    from ptqkit import plotting

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'ptqkit\[plot\]'"):
        plotting.pyplot()


def test_the_library_does_not_import_bench_sweep_or_matplotlib() -> None:
    import subprocess
    import sys

    code = ("import sys, ptqkit, ptqkit.algorithms, ptqkit.export.onnx; "
            "bad = [m for m in ('ptqkit.bench', 'ptqkit.sweep', 'ptqkit.peers', 'matplotlib') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_bench_methods_are_the_named_recipe_files_a_user_can_load() -> None:
    from ptqkit.pipeline import Recipe

    files = sorted(bench.RECIPES_DIR.glob("*.yaml"))
    assert {p.stem for p in files} == set(bench.METHODS) and len(files) >= 20
    for path in files:
        recipe = Recipe.from_yaml(path)  # each file alone is a valid recipe
        row = bench.METHODS[path.stem](BenchConfig(w_bits=3, a_bits=5, seed=7))
        assert row.seed == 7 and row.steps == recipe.steps and row.w_range == recipe.w_range
        assert (row.w_bits, row.a_bits) == ((recipe.w_bits, recipe.a_bits) if path.stem in
                                            ("light", "advanced") else (3, 5))


def test_a_recipe_file_is_a_bench_method(tiny: nn.Module, one_thread: None, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    suite = _tiny_suite(tiny, [])
    monkeypatch.setitem(bench.SUITES, "tiny", lambda cfg: suite)
    mine = tmp_path / "mine.yaml"
    mine.write_text("version: 1\nw_range: minmax\na_range: percentile\n")
    row, = bench.run_bench("tiny", [str(mine)], BenchConfig(w_bits=4, a_bits=4, calib_size=10))
    assert row["method"] == str(mine) and row["recipe"]["a_range"] == "percentile"
    assert row["recipe"]["w_bits"] == 4 and 0 <= row["agreement"] <= 100
    for bad, words in ((str(tmp_path / "none.yaml"), "not found"), ("nope", "unknown method")):
        with pytest.raises(ValueError, match=words):
            bench.run_bench("tiny", [bad], BenchConfig())
    (tmp_path / "bad.yaml").write_text("w_bits: [1\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        bench.run_bench("tiny", [str(tmp_path / "bad.yaml")], BenchConfig())


def test_holdout_is_refused_where_the_suite_has_no_held_out_calibration_images() -> None:
    with pytest.raises(ValueError, match="holdout"):
        bench.run_bench("fmnist-resnet20", ["minmax"], BenchConfig(holdout=100))
    with pytest.raises(ValueError, match="holdout"):
        BenchConfig(holdout=-1)


def test_aciq_methods_follow_banner_and_aciq_wa_clips_weights_too() -> None:
    cfg = BenchConfig(w_bits=3, a_bits=3)
    for name, steps in (("aciq", []), ("aciq+bc", ["bias_correction"]),
                        ("aciq+alloc", ["bit_allocation"])):
        r = METHODS[name](cfg)
        # ACIQ clips activations; weights stay per-channel min-max (Banner et al.)
        assert (r.w_range, r.a_range, [s.name for s in r.steps]) == ("minmax", "aciq", steps)
        assert (r.w_bits, r.a_bits, r.first_last_8bit) == (3, 3, True)
    r = METHODS["aciq-wa+bc"](cfg)
    assert (r.w_range, r.a_range, [s.name for s in r.steps]) == ("aciq", "aciq", ["bias_correction"])
    assert [s.name for s in METHODS["lapq"](cfg).steps] == ["lapq"]


def test_seq_adaquant_start_point_methods() -> None:
    cfg = BenchConfig(w_bits=4, a_bits=4)
    # fixed starts: AdaQuant must not switch away from the ranges the method names
    for name, ranges in (("mse+seq-adaquant", ("mse", "mse")), ("aciq+seq-adaquant", ("minmax", "aciq"))):
        r = METHODS[name](cfg)
        assert (r.w_range, r.a_range, [s.name for s in r.steps]) == (*ranges, ["adaquant"])
        assert dict(r.steps[0].options) == {"start": "given"}
    r = METHODS["lapq+seq-adaquant"](cfg)
    assert [s.name for s in r.steps] == ["lapq", "adaquant"]
    assert dict(r.steps[1].options) == {"start": "given"} and (r.w_bits, r.a_bits) == (4, 4)
    r = METHODS["seq-adaquant"](cfg)  # the default: sequential, start chosen by calibration KL
    assert [s.name for s in r.steps] == ["adaquant"] and dict(r.steps[0].options) == {}
