"""Issue 4: which statistics should BN tuning restore? Calibration data only, never the test split.

Calibration: 1000 balanced train images (seed 0); evaluation: 1000 *other* train images.
For each suite: the float model with BNT applied (how far BNT moves an unquantized model), and
W4A4 models (first/last 8-bit) from MSE ranges and from seq-AdaQuant with BNT target "bn" (the
paper: folded BN's training statistics) or "float" (the float model's calibration statistics),
both without the KL guard so the raw effect is visible (what the default target="best" chooses
between).

usage: PYTHONPATH=src python results/issue4/bnt_target.py OUT.json [adaquant]
"""
import copy
import json
import sys

import torch

from ptqkit.algorithms.bn_tuning import float_moments, tune_batchnorm
from ptqkit.calib.data import CalibrationData
from ptqkit.evaluate import evaluate
from ptqkit.nn.control import float_weights, original_float, quantizers_disabled
from ptqkit.pipeline import Recipe, quantize
from ptqkit.zoo import load_model
from ptqkit.zoo.fmnist import calibration_indices, load_split

torch.set_num_threads(1)
x, y = load_split("train")
idx = calibration_indices(y, per_class=200, seed=0)[:2000]
cal, held = idx[:1000], idx[1000:]
calib = CalibrationData(x[cal], batch_size=100)
rows = []


def row(suite: str, what: str, model: torch.nn.Module, ref: torch.nn.Module) -> None:
    r = {"suite": suite, "what": what, **evaluate(model, ref, x[held], y[held])}
    rows.append(r)
    print(r, flush=True)


for suite in ("fmnist-resnet20", "fmnist-mobilenetv2"):
    m = load_model(suite)
    q = quantize(m, calib, Recipe(w_bits=8, a_bits=8))
    with quantizers_disabled(q):
        row(suite, "float", q, m)
        for target in ("bn", "float"):
            t = float_moments(q, calib) if target == "float" else None
            h = tune_batchnorm(q, calib, t)
            row(suite, f"float + BNT target={target}", q, m)
            h.undo()
    seq = "adaquant" in sys.argv[2:]
    base = "seq-adaquant" if seq else "mse"
    q0 = quantize(m, calib, Recipe(w_bits=4, a_bits=4).with_steps(*(["adaquant"] if seq else [])))
    fw = float_weights(quantize(m, calib, Recipe(w_bits=4, a_bits=4)))  # the unadapted weights
    row(suite, f"W4A4 {base}", q0, m)
    for target in ("bn", "float"):
        q = copy.deepcopy(q0)
        t = float_moments(q, calib, original_float(q, fw)) if target == "float" else None
        tune_batchnorm(q, calib, t)
        row(suite, f"W4A4 {base} + BNT target={target}", q, m)
json.dump(rows, open(sys.argv[1], "w"), indent=1)
