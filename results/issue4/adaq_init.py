"""Issue 4: where should sequential AdaQuant start? Calibration-set evidence only.

seq-AdaQuant (default: MSE ranges) has the lower test KL but the lower top-1 than LAPQ on
fmnist-mobilenetv2 W4A4. This compares, on held-out *train* images (never the test split),
LAPQ alone with seq-AdaQuant started from MSE ranges, from ACIQ activation ranges, and from LAPQ's
clipping. N balanced train images calibrate, N others evaluate (same draw as seq_target.py).

usage: PYTHONPATH=src python results/issue4/adaq_init.py SUITE OUT.json [N] [SEED]
"""

from __future__ import annotations

import sys

from seq_target import compare

from ptqkit.pipeline import Recipe

VARIANTS = {
    "lapq": {"w_range": "minmax", "a_range": "minmax", "steps": ["lapq"]},
    "seq/mse": {"steps": ["adaquant"]},
    "seq/aciq": {"w_range": "minmax", "a_range": "aciq", "steps": ["adaquant"]},
    "seq/lapq": {"w_range": "minmax", "a_range": "minmax", "steps": ["lapq", "adaquant"]},
}


def main(suite: str, out: str, n: int = 1000, seed: int = 0) -> None:
    base = Recipe(w_bits=4, a_bits=4, seed=seed).to_dict()
    compare(suite, out, {name: Recipe.from_dict({**base, **kw}) for name, kw in VARIANTS.items()},
            n, seed)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
