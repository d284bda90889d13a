"""Issue 4 (session 10): why does parallel AdaQuant on ONE calibration image hurt fmnist-mobilenetv2?

Calibration data only, never the test split. The calibration image is the study's
(fmnist_calibration(1, seed)); the held-out set is 1000 balanced *train* images drawn with another
seed (the calibration image removed). For each variant: held-out KL(float || quant), agreement and
top-1 (float top-1 on the same images beside it), plus per-layer held-out MSE of every quantized
layer on *float* inputs (parallel AdaQuant's own objective, measured on images it never saw).

Variants: "minmax" (misnamed, kept for the stored files: the default Recipe's MSE ranges, which is
AdaQuant's starting point), "minmax-ranges" (true min-max ranges, the study's baseline), parallel
AdaQuant with every group learned (default), with one group
frozen (lr 0: weights, bias, weight-quantizer, input-quantizer), and "keep-depthwise": the default
run with the depthwise layers put back to their min-max state (parallel layers are independent, so
this equals not running AdaQuant on them). Then the fix: held-out iterate selection (holdout
"auto", fractions 0.25 / 0.5), and sequential AdaQuant without / with it.

usage: PYTHONPATH=src python results/issue4/diag_1img.py SUITE OUT.json SEEDS [VARIANTS]
  SEEDS: comma list (e.g. 0,2); VARIANTS: comma list of names in VARIANTS (default: all)
"""

from __future__ import annotations

import copy
import json
import sys
import time
from typing import Any

import torch
from torch import nn

from ptqkit.calib.data import CalibrationData
from ptqkit.evaluate import evaluate
from ptqkit.nn.control import quantizers_disabled
from ptqkit.nn.modules import QuantModule, quant_layers
from ptqkit.pipeline import Recipe, StepSpec, quantize
from ptqkit.zoo import load_model
from ptqkit.zoo.fmnist import calibration_indices, load_split

HELD_SEED = 12345
VARIANTS: dict[str, dict[str, Any] | None] = {
    "minmax": None,  # misnamed: the default Recipe's MSE ranges, i.e. AdaQuant's starting point
    "minmax-ranges": None,  # true min-max ranges (the study's "minmax" method)
    "adaquant": {"mode": "parallel", "holdout": "never"},  # session 9's AdaQuant
    "freeze-weight": {"mode": "parallel", "holdout": "never", "lr_weight": 0.0},
    "freeze-bias": {"mode": "parallel", "holdout": "never", "lr_bias": 0.0},
    "freeze-wq": {"mode": "parallel", "holdout": "never", "lr_w_qparams": 0.0},
    "freeze-aq": {"mode": "parallel", "holdout": "never", "lr_a_qparams": 0.0},
    "only-aq": {"mode": "parallel", "holdout": "never", "lr_weight": 0.0, "lr_bias": 0.0,
                "lr_w_qparams": 0.0},
    "keep-depthwise": {"mode": "parallel", "holdout": "never"},  # post-processed below
    # the fix (session 10): held-out selection + weights frozen where under-determined (default),
    # the same with a larger held-out share, and held-out selection alone
    "auto": {"mode": "parallel", "holdout": "auto"},
    "auto-f50": {"mode": "parallel", "holdout": "auto", "holdout_fraction": 0.5},
    "auto-nofreeze": {"mode": "parallel", "holdout": "auto", "freeze_underdetermined": False},
    "auto-noaq": {"mode": "parallel", "holdout": "auto", "lr_a_qparams": 0.0},
    "seq-never": {"mode": "sequential", "holdout": "never"},
    "seq-auto": {"mode": "sequential", "holdout": "auto"},
}


def is_depthwise(m: QuantModule) -> bool:
    return int(getattr(m, "groups", 1)) > 1


def put_back(model: nn.Module, start: nn.Module, names: list[str]) -> nn.Module:
    """Copy of ``model`` whose layers ``names`` are replaced by ``start``'s (min-max) layers."""
    out = copy.deepcopy(model)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, leaf,
                copy.deepcopy(start.get_submodule(name)))
    return out


@torch.no_grad()
def layer_heldout_mse(qmodel: nn.Module, start: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per layer: MSE of qmodel's layer vs the float layer, both on the float model's inputs."""
    ref = copy.deepcopy(start)
    qlayers = quant_layers(qmodel)
    acc: dict[str, list[float]] = {n: [0.0, 0.0] for n in qlayers}
    handles = []
    for name, lay in quant_layers(ref).items():
        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor, name: str = name) -> None:
            y = qlayers[name](args[0])
            acc[name][0] += float(((y - out) ** 2).sum())
            acc[name][1] += out.numel()
        handles.append(lay.register_forward_hook(hook))
    try:
        with quantizers_disabled(ref):
            for i in range(0, x.shape[0], 250):
                ref(x[i:i + 250])
    finally:
        for h in handles:
            h.remove()
    return {n: s / c for n, (s, c) in acc.items()}


def main(suite: str, out: str, seeds: list[int], names: list[str]) -> None:
    torch.set_num_threads(1)
    x, y = load_split("train")
    model = load_model(suite)
    rows = []
    for seed in seeds:
        cal = calibration_indices(y, per_class=1, seed=seed)[:1]
        held = calibration_indices(y, per_class=101, seed=HELD_SEED)
        held = held[~torch.isin(held, cal)][:1000]
        calib = CalibrationData(x[cal], batch_size=100)
        start = quantize(model, calib, Recipe(w_bits=4, a_bits=4, first_last_8bit=True, seed=seed))
        base_mse = layer_heldout_mse(start, start, x[held])
        dw = [n for n, m in quant_layers(start).items() if is_depthwise(m)]
        for name in names:
            opts = VARIANTS[name]
            t0 = time.perf_counter()
            if name == "minmax-ranges":
                q = quantize(model, calib, Recipe(w_bits=4, a_bits=4, first_last_8bit=True,
                                                  seed=seed, w_range="minmax", a_range="minmax"))
            elif opts is None:
                q = start
            else:
                recipe = Recipe(w_bits=4, a_bits=4, first_last_8bit=True, seed=seed).with_steps(
                    StepSpec("adaquant", opts))
                q = quantize(model, calib, recipe)
                if name == "keep-depthwise":
                    q = put_back(q, start, dw)
            res = evaluate(q, model, x[held], y[held])
            mse = layer_heldout_mse(q, start, x[held])
            fit = {n: d.get("adaquant", {}) for n, d in q.report.layers.items()} \
                if opts is not None else {}
            ratio = {n: mse[n] / max(base_mse[n], 1e-30) for n in mse}
            rows.append({"suite": suite, "seed": seed, "calib_index": int(cal[0]), "variant": name,
                         "seconds": time.perf_counter() - t0, "heldout_kl": res["kl"],
                         "heldout_agreement": res["agreement"], "heldout_top1": res["top1"],
                         "heldout_fp32_top1": res["fp32_top1"],
                         "layers_worse_heldout": sum(r > 1.0 for r in ratio.values()),
                         "layer_heldout_ratio": ratio,
                         "layer_fit_ratio": {n: f["mse_after"] / max(f["mse_before"], 1e-30)
                                             for n, f in fit.items() if f},
                         "depthwise": dw})
            print(json.dumps({k: v for k, v in rows[-1].items()
                              if not isinstance(v, (dict, list))}), flush=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")],
         sys.argv[4].split(",") if len(sys.argv) > 4 else list(VARIANTS))
