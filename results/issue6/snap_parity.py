"""Parity (sim vs ONNX Runtime) of the deploy recipe with and without bias snapping.

PYTHONPATH=src python results/issue6/snap_parity.py SUITE W_BITS N_TEST   (calibration: 256 images)
"""
import sys, torch, numpy as np, dataclasses
torch.set_num_threads(1)
from pathlib import Path
import ptqkit
from ptqkit.bench import SUITES, BenchConfig
from ptqkit.export.deploy_bench import deploy_recipe, parity
from ptqkit.export.onnx import export_onnx
from ptqkit.pipeline import StepSpec
name, wb, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = BenchConfig(w_bits=wb, a_bits=8, calib_size=256)
suite = SUITES[name](cfg)
calib = suite.calib(256, 0)
r = deploy_recipe(suite, cfg)
for snap in (False, True):
    steps = tuple(StepSpec(s.name, {**dict(s.options or {}), "snap_bias": snap}) if s.name == "int_outputs" else s for s in r.steps)
    q = ptqkit.quantize(suite.float_model, calib, dataclasses.replace(r, steps=steps))
    p = Path(f"/tmp/s9d/par-{name}-{snap}.onnx")
    export_onnx(q, p, suite.x_test[:1])
    print(snap, parity(q, p, suite.x_test[:n], suite.y_test[:n]), flush=True)
