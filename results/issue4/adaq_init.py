"""Issue 4: where should sequential AdaQuant start? Calibration-set evidence only.

seq-AdaQuant (default: MSE ranges) has the lower test KL but the lower top-1 than LAPQ on
fmnist-mobilenetv2 W4A4. This compares, on held-out *train* images (never the test split),
LAPQ alone with seq-AdaQuant started from MSE ranges, from ACIQ activation ranges, and from LAPQ's
clipping. N balanced train images calibrate, N others evaluate (same draw as seq_target.py).

usage: PYTHONPATH=src python results/issue4/adaq_init.py SUITE OUT.json [N] [SEED]
"""

from __future__ import annotations

import json
import sys
import time

import torch

from ptqkit.calib.data import CalibrationData
from ptqkit.evaluate import evaluate
from ptqkit.pipeline import Recipe, quantize
from ptqkit.zoo import load_model
from ptqkit.zoo.fmnist import calibration_indices, load_split

VARIANTS = {
    "lapq": {"w_range": "minmax", "a_range": "minmax", "steps": ["lapq"]},
    "seq/mse": {"steps": ["adaquant"]},
    "seq/aciq": {"w_range": "minmax", "a_range": "aciq", "steps": ["adaquant"]},
    "seq/lapq": {"w_range": "minmax", "a_range": "minmax", "steps": ["lapq", "adaquant"]},
}


def main(suite: str, out: str, n: int = 1000, seed: int = 0) -> None:
    torch.manual_seed(seed)
    x, y = load_split("train")
    idx = calibration_indices(y, per_class=-(-2 * n // 10), seed=seed)[: 2 * n]
    calib, held = idx[:n], idx[n:]
    model = load_model(suite)
    rows = []
    for name, kw in VARIANTS.items():
        recipe = Recipe.from_dict({**Recipe(w_bits=4, a_bits=4, seed=seed).to_dict(), **kw})
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
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
