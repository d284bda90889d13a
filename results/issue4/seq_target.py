"""Issue 4, item 1: which target should sequential AdaQuant fit? Calibration-set evidence only.

Draws 2*N balanced Fashion-MNIST *train* images (seed S), quantizes W4A4 (first/last 8-bit) on
the first N and measures KL(float || quant), agreement and top-1 on the other N (held out; never
the test split). Compares parallel AdaQuant with sequential AdaQuant for both targets.

usage: PYTHONPATH=src python results/issue4/seq_target.py SUITE OUT.json [N] [SEED]
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ptqkit.calib.data import CalibrationData
from ptqkit.evaluate import evaluate
from ptqkit.pipeline import Recipe, StepSpec, quantize
from ptqkit.zoo import load_model
from ptqkit.zoo.fmnist import calibration_indices, load_split

VARIANTS = {
    "parallel": {"mode": "parallel"},
    "seq/float_model": {"mode": "sequential", "target": "float_model"},
    "seq/float_layer": {"mode": "sequential", "target": "float_layer"},
}


def compare(suite: str, out: str, recipes: dict[str, Recipe], n: int = 1000, seed: int = 0,
            extra: Callable[[torch.nn.Module], dict[str, Any]] | None = None) -> None:
    """Quantize with each recipe on N balanced train images, measure on N others, write rows
    (plus ``extra(quantized_model)`` when given)."""
    torch.manual_seed(seed)
    x, y = load_split("train")
    idx = calibration_indices(y, per_class=-(-2 * n // 10), seed=seed)[: 2 * n]
    calib, held = idx[:n], idx[n:]
    model = load_model(suite)
    rows = []
    for name, recipe in recipes.items():
        t0 = time.perf_counter()
        q = quantize(model, CalibrationData(x[calib], batch_size=100), recipe)
        sec = time.perf_counter() - t0
        fit = evaluate(q, model, x[calib], y[calib])
        res = evaluate(q, model, x[held], y[held])
        rows.append({"suite": suite, "variant": name, "n": n, "seed": seed, "seconds": sec,
                     "heldout_kl": res["kl"], "heldout_agreement": res["agreement"],
                     "heldout_top1": res["top1"], "heldout_fp32_top1": res["fp32_top1"],
                     "calib_kl": fit["kl"], "calib_agreement": fit["agreement"]})
        print(json.dumps(rows[-1]), flush=True)
        rows[-1].update(extra(q) if extra else {})  # stored, not printed
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


def main(suite: str, out: str, n: int = 1000, seed: int = 0) -> None:
    recipes = {name: Recipe(w_bits=4, a_bits=4, first_last_8bit=True, seed=seed).with_steps(
        StepSpec("adaquant", opts)) for name, opts in VARIANTS.items()}
    compare(suite, out, recipes, n, seed)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
