"""`ptqkit export RUN_DIR --onnx FILE --packed FILE`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import ort_saturates
from tests.test_cli import user_model  # noqa: F401  (fixture)

from ptqkit.cli import main
from ptqkit.runs import load_run

pytest.importorskip("onnxruntime")


def test_export_run_dir(user_model, tmp_path: Path, capsys) -> None:  # noqa: F811
    net, weights, calib = user_model
    run = tmp_path / "run"
    assert main(["quantize", f"{net}:make", "--weights", str(weights), "--calib", str(calib),
                 "--range", "minmax", "--out", str(run),
                 *(["--w-bits", "7", "--no-first-last-8bit"] if ort_saturates() else [])]) == 0
    onnx_path, packed = tmp_path / "m.onnx", tmp_path / "m.safetensors"
    assert main(["export", str(run), "--onnx", str(onnx_path), "--packed", str(packed)]) == 0
    assert onnx_path.is_file() and packed.is_file()
    from ptqkit.export.onnx import ort_load

    qmodel, _, _ = load_run(run)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        sim = qmodel(x).numpy()
    out = ort_load(onnx_path).run(None, {"input": x.numpy()})[0]
    assert np.abs(out - sim).max() <= 2 * float(sim.max() - sim.min()) / 255


def test_export_needs_a_target(user_model, tmp_path: Path, capsys) -> None:  # noqa: F811
    net, weights, calib = user_model
    run = tmp_path / "run"
    main(["quantize", f"{net}:make", "--weights", str(weights), "--calib", str(calib),
          "--range", "minmax", "--out", str(run)])
    assert main(["export", str(run)]) != 0
    assert "nothing to export" in capsys.readouterr().err


def test_export_prints_what_keeps_layers_off_fast_kernels(user_model, tmp_path: Path,  # noqa: F811
                                                          capsys) -> None:
    net, weights, calib = user_model
    recipe = tmp_path / "asym.yaml"
    recipe.write_text("w_symmetric: false\n")
    run = tmp_path / "run"
    assert main(["quantize", f"{net}:make", "--weights", str(weights), "--calib", str(calib),
                 "--recipe", str(recipe), "--range", "minmax", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--onnx", str(tmp_path / "m.onnx")]) == 0
    notes = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("note:")]
    assert any("uint8" in n and "w_symmetric=True" in n for n in notes)
