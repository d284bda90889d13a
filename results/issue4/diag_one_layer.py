"""Issue 4 (session 10): one layer's parallel-AdaQuant result applied alone to the min-max model.

One calibration image (fmnist_calibration(1, SEED)); AdaQuant (holdout="never") on layer LAYER only,
with all parameter groups or one group at a time; model KL(float || quant) on the 1000 held-out
train images of diag_1img.py. Shows that a layer-level gain can be a model-level loss.

usage: PYTHONPATH=src python results/issue4/diag_one_layer.py SUITE SEED LAYER
"""

from __future__ import annotations

import copy
import sys

import torch
from diag_1img import HELD_SEED

from ptqkit.algorithms.adaquant import AdaQuantOptions, adaquant_layer, capture_layer_input
from ptqkit.calib.data import CalibrationData
from ptqkit.evaluate import evaluate, predict
from ptqkit.nn.control import quantizers_disabled
from ptqkit.pipeline import Recipe, quantize
from ptqkit.zoo import load_model
from ptqkit.zoo.fmnist import calibration_indices, load_split

GROUPS = {"all": {}, "weights": {"lr_bias": 0, "lr_w_qparams": 0, "lr_a_qparams": 0},
          "bias": {"lr_weight": 0, "lr_w_qparams": 0, "lr_a_qparams": 0},
          "w-quantizer": {"lr_weight": 0, "lr_bias": 0, "lr_a_qparams": 0},
          "input-quantizer": {"lr_weight": 0, "lr_bias": 0, "lr_w_qparams": 0}}


def main(suite: str, seed: int, lname: str) -> None:
    torch.set_num_threads(1)
    x, y = load_split("train")
    model = load_model(suite)
    cal = calibration_indices(y, per_class=1, seed=seed)[:1]
    held = calibration_indices(y, per_class=101, seed=HELD_SEED)
    held = held[~torch.isin(held, cal)][:1000]
    calib = CalibrationData(x[cal], batch_size=100)
    start = quantize(model, calib, Recipe(w_bits=4, a_bits=4, first_last_8bit=True, seed=seed))
    ref = predict(model, x[held])
    fl = copy.deepcopy(start)
    with quantizers_disabled(fl), torch.no_grad():
        layer = fl.get_submodule(lname)
        xin = capture_layer_input(fl, layer, calib, calib.batches[0])
        yt = layer.op(xin, layer.weight, layer.bias)
    print(f"min-max: held-out KL {evaluate(start, model, x[held], y[held], ref)['kl']:.4f}")
    for name, kw in GROUPS.items():
        m = copy.deepcopy(start)
        lay = m.get_submodule(lname)
        st = adaquant_layer(lay, xin, yt, AdaQuantOptions(holdout="never", **kw))
        kl = evaluate(m, model, x[held], y[held], ref)["kl"]
        print(f"learn {name:15s}: fit MSE x{st.mse_after / st.mse_before:.3f}, held-out KL {kl:.4f}, "
              f"input step {float(start.get_submodule(lname).a_quant.scale.detach()):.4f} -> "
              f"{float(lay.a_quant.scale.detach()):.4f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
