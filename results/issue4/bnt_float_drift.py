"""Issue 4 side finding: BN tuning applied to the *float* (folded, quantizers off) model moves it
away from the float model, i.e. the statistics BNT restores (the training running statistics)
are not the float model's own statistics on the calibration data. Seconds of CPU.
Calibration: 1000 balanced train images (seed 0); evaluation: 1000 other train images.

usage: PYTHONPATH=src python results/issue4/bnt_float_drift.py
"""
import torch

from ptqkit.algorithms.bn_tuning import tune_batchnorm
from ptqkit.calib.data import CalibrationData
from ptqkit.evaluate import evaluate
from ptqkit.nn.control import quantizers_disabled
from ptqkit.pipeline import Recipe, quantize
from ptqkit.zoo import load_model
from ptqkit.zoo.fmnist import calibration_indices, load_split

torch.set_num_threads(1)
x, y = load_split("train")
idx = calibration_indices(y, per_class=200, seed=0)[:2000]
cal, held = idx[:1000], idx[1000:]
for suite in ("fmnist-resnet20", "fmnist-mobilenetv2"):
    m = load_model(suite)
    q = quantize(m, CalibrationData(x[cal], batch_size=100), Recipe(w_bits=8, a_bits=8, first_last_8bit=True))
    with quantizers_disabled(q):
        print(suite, "float (folded) vs float:", evaluate(q, m, x[held], y[held]))
        h = tune_batchnorm(q, CalibrationData(x[cal], batch_size=100))
        print(suite, "float + BNT vs float:", evaluate(q, m, x[held], y[held]))
