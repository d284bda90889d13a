"""`ptqkit quantize` method flags: --range, --bias-correction, --bit-allocation, --lapq."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ptqkit.cli import main
from ptqkit.runs import load_run

MODEL_PY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 3))
"""


@pytest.fixture
def user_model(tmp_path: Path) -> list[str]:
    """argv prefix quantizing a tiny user model on 32 random calibration inputs."""
    (tmp_path / "net.py").write_text(MODEL_PY)
    ns: dict = {}
    exec(MODEL_PY, ns)
    torch.save(ns["make"]().state_dict(), tmp_path / "w.pt")
    torch.save(torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
               tmp_path / "calib.pt")
    return ["quantize", f"{tmp_path / 'net.py'}:make", "--weights", str(tmp_path / "w.pt"),
            "--calib", str(tmp_path / "calib.pt"), "--w-bits", "4", "--a-bits", "4",
            "--no-first-last-8bit"]


def _run(argv: list[str], out: Path) -> dict:
    assert main(argv + ["--out", str(out)]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("method", ["aciq", "lp", "mse", "minmax", "percentile"])
def test_range_flag_sets_both_ranges(user_model, tmp_path: Path, method: str) -> None:
    report = _run(user_model + ["--range", method], tmp_path / "run")
    assert report["recipe"]["w_range"] == report["recipe"]["a_range"] == method
    assert report["layers"]["0"]["w_range"] == report["layers"]["0"]["a_range"] == method


def test_method_flags_add_steps_in_order_and_the_run_reloads(user_model, tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = _run(user_model + ["--range", "aciq", "--bias-correction", "--bit-allocation"], out)
    assert [s["step"] for s in report["steps"]] == ["ranges", "bit_allocation",
                                                    "bias_correction", "total"]
    assert [s["name"] for s in report["recipe"]["steps"]] == ["bit_allocation", "bias_correction"]
    assert report["layers"]["3"]["w_bits_mean"] <= 4.0
    assert "bias_correction" in report["layers"]["3"]
    qmodel, _, _ = load_run(out)  # channel bits and corrected biases survive save/load
    saved = torch.load(out / "quantized.pt", weights_only=True)
    assert torch.equal(qmodel.state_dict()["3.bias"], saved["3.bias"])


def test_lapq_flag(user_model, tmp_path: Path) -> None:
    report = _run(user_model + ["--lapq"], tmp_path / "run")
    lapq = [s for s in report["steps"] if s["step"] == "lapq"][0]
    assert lapq["final_loss"] <= lapq["init_loss"]
    assert report["layers"]["0"]["w_range"].startswith("lapq(")


@pytest.mark.parametrize("extra, message", [
    (["--lapq", "--range", "aciq"], "--lapq sets the clipping ranges itself"),
    (["--lapq", "--bit-allocation"], "cannot be combined"),
    (["--range", "nope"], "unknown range method 'nope'"),
    (["--pipeline", "light", "--bit-allocation"], "cannot follow a mixed-precision pipeline"),
])
def test_invalid_combinations_are_one_line_errors(user_model, tmp_path: Path, capsys,
                                                  extra: list[str], message: str) -> None:
    assert main(user_model + extra + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptqkit: error:") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_flag_duplicating_a_recipe_step_is_an_error(user_model, tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [bias_correction]\n")
    argv = user_model + ["--recipe", str(recipe), "--bias-correction", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "already runs the bias_correction step" in capsys.readouterr().err
