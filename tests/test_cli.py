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
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))
"""


@pytest.fixture
def user_model(tmp_path: Path) -> tuple[Path, Path, Path]:
    (tmp_path / "net.py").write_text(MODEL_PY)
    ns: dict = {}
    exec(MODEL_PY, ns)
    weights = tmp_path / "w.pt"
    torch.save(ns["make"]().state_dict(), weights)
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(32, 1, 8, 8), calib)
    return tmp_path / "net.py", weights, calib


def test_quantize_user_model_writes_run_that_reloads(user_model, tmp_path: Path, capsys) -> None:
    net, weights, calib = user_model
    out = tmp_path / "run"
    rc = main(["quantize", f"{net}:make", "--weights", str(weights), "--calib", str(calib),
               "--w-bits", "4", "--a-bits", "8", "--out", str(out)])
    assert rc == 0
    assert {p.name for p in out.iterdir()} == {"run.json", "recipe.yaml", "report.json",
                                               "quantized.pt", "example.pt", "report.html"}
    report = json.loads((out / "report.json").read_text())
    assert report["layers"]["0"]["w_bits"] == 8 and report["recipe"]["w_bits"] == 4
    qmodel, float_model, meta = load_run(out)
    x = torch.randn(5, 1, 8, 8)
    # the rebuilt model computes what the quantized model computed when it was saved
    from ptqkit import Recipe, quantize
    again = quantize(float_model, torch.load(calib), Recipe(w_bits=4, a_bits=8))
    with torch.no_grad():
        assert torch.equal(qmodel(x), again(x))


@pytest.mark.parametrize("argv, message", [
    (["quantize", "nope", "--out", "X"], "neither a zoo name"),
    (["quantize", "missing.py:f", "--out", "X"], "does not exist"),
    (["quantize", "fmnist-resnet20", "--w-bits", "1", "--out", "X"], "bits"),
    (["quantize", "fmnist-resnet20", "--range", "bogus", "--out", "X"], "unknown range method"),
    (["bench", "--suite", "nope", "--methods", "minmax"], "unknown suite"),
    (["bench", "--suite", "fmnist-resnet20", "--deploy", "--latency-threads", "0"],
     "latency_threads must be >= 1"),
    (["eval", "/nonexistent"], "not a ptqkit run directory"),
])
def test_bad_input_is_one_line_error(argv, message: str, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptqkit: error:") and message in err and "\n" not in err
    assert not (tmp_path / "X").exists()


def test_existing_out_is_not_overwritten(user_model, tmp_path: Path, capsys) -> None:
    net, weights, calib = user_model
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["quantize", f"{net}:make", "--weights", str(weights), "--calib", str(calib),
               "--out", str(out)])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_override_flag_parsing(user_model, tmp_path: Path) -> None:
    net, weights, calib = user_model
    out = tmp_path / "run"
    assert main(["quantize", f"{net}:make", "--weights", str(weights), "--calib", str(calib),
                 "--override", "4=3,5", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["bits"]["4"] == [3, 5]


def test_run_with_output_quantizers_reloads(user_model, tmp_path: Path) -> None:
    net, weights, calib = user_model
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("w_bits: 8\na_bits: 8\nsteps: [int_outputs]\n")
    assert main(["quantize", f"{net}:make", "--weights", str(weights), "--calib", str(calib),
                 "--recipe", str(recipe), "--out", str(out)]) == 0
    qmodel, _, meta = load_run(out)
    assert meta["output_bits"] and all(qmodel.get_submodule(n).o_quant is not None
                                       for n in meta["output_bits"])


def test_recipe_by_name_loads_the_shipped_recipe(user_model, tmp_path: Path, capsys) -> None:
    net, weights, calib = user_model
    out = tmp_path / "run"
    assert main(["quantize", f"{net}:make", "--weights", str(weights), "--calib", str(calib),
                 "--recipe", "fast", "--w-bits", "8", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["w_range"] == "percentile" and report["recipe"]["w_symmetric"] is False
    assert main(["quantize", f"{net}:make", "--weights", str(weights), "--calib", str(calib),
                 "--recipe", "no-such-recipe", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-recipe" in err[0] and not (tmp_path / "r2").exists()
