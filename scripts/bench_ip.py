"""Time the bit-allocation MILP on a synthetic 100-layer x 49-option table (relaxed 2..8 x 2..8).

Usage: PYTHONPATH=src python scripts/bench_ip.py [--layers 100] [--repeats 5]
Prints the median wall-clock of solve_ip for a compression and a BOPs budget and for the eq. 5
loss-budget form, plus greedy-accuracy for reference (same table, same machine, same run).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ptqkit.algorithms import ip


def synthetic_table(layers: int, seed: int = 0) -> ip.SensitivityTable:
    rng = np.random.default_rng(seed)
    options = ip.candidate_options("relaxed")
    w = np.array([o[0] for o in options], float)
    a = np.array([o[1] for o in options], float)
    sens = rng.lognormal(0, 1, (layers, 1))  # per-layer sensitivity, noise ~ 4^-bits
    loss = sens * (4.0 ** -w + 0.5 * 4.0 ** -a)[None, :] * rng.uniform(0.8, 1.2, (layers, len(options)))
    params = rng.integers(1_000, 2_000_000, layers)
    macs = params * rng.integers(1, 200, layers)
    return ip.SensitivityTable([f"layer{i}" for i in range(layers)], options, loss, params, macs,
                               np.ones_like(loss, bool), {"gain": "compression"})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    t = synthetic_table(args.layers)
    loss_mid = float(np.median(t.loss.sum(0)))
    cases = [("ip", ip.Budget("compression", 0.13)), ("ip", ip.Budget("bops", 0.02)),
             ("ip", ip.Budget("loss", loss_mid)), ("greedy-accuracy", ip.Budget("compression", 0.13))]
    for method, budget in cases:
        times, sol = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sol = ip.SOLVERS[method](t, budget)
            times.append(time.perf_counter() - t0)
        assert sol is not None
        print(f"{method:16s} {budget.kind}<={budget.value:.4g}: median {statistics.median(times):.3f}s "
              f"(max {max(times):.3f}s) over {args.repeats}; {sol.status}; "
              f"compression {sol.predicted['compression']:.4f} loss {sol.predicted['loss']:.4g}")


if __name__ == "__main__":
    main()
