"""Bit allocation as an integer program, and the greedy baselines (section 3.2 / 5.4 of Hubara et al.).

Pure numbers in, a choice out: no model, no hooks. A :class:`SensitivityTable` holds, for every
quantized layer ``l`` and every candidate option ``o = (w_bits, a_bits)``:

- ``loss[l, o]``: the loss increase measured with only layer ``l`` at option ``o`` (``dL`` of
  eq. 5, additivity assumed: the predicted loss of a configuration is the sum over layers);
- ``params[l]``, ``macs[l]``: from which size (bits) = params x w_bits and
  BOPs = MACs x w_bits x a_bits follow (the additive performance measures ``dP``).

Options a layer may not take (e.g. a layer pinned to 8 bits) are masked out by ``allowed``.
Budgets are a :class:`Budget`: ``compression`` / ``bops`` are ratios to the 32-bit float model
(all-8-bit weights = 0.25), ``loss`` is an absolute bound on the predicted loss increase.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

__all__ = ["Option", "SensitivityTable", "Budget", "Solution", "InfeasibleBudgetError",
           "candidate_options", "solve_ip", "ip_alternatives", "greedy_accuracy", "greedy_compression",
           "brute_force", "SOLVERS", "TABLE_VERSION", "neighbour_mask", "local_table", "changed",
           "check_feasible"]

Option = tuple[int, int]  # (w_bits, a_bits)
TABLE_VERSION = 1
FLOAT_BITS = 32


def candidate_options(spec: str | Sequence[Sequence[int]]) -> list[Option]:
    """'default' -> [(8, 8), (4, 4)]; 'relaxed' -> every (w, a) in 2..8 x 2..8 (49 options);
    'w8a8,w4a4,...' or [[8, 8], [4, 4]] -> those options. Raises ValueError when empty or invalid."""
    if isinstance(spec, str):
        if spec == "default":
            return [(8, 8), (4, 4)]
        if spec == "relaxed":
            return [(w, a) for w, a in product(range(8, 1, -1), repeat=2)]
        spec = [_parse_option(s) for s in spec.split(",") if s.strip()]
    opts = [(int(o[0]), int(o[1])) for o in spec]
    if not opts:
        raise ValueError("the candidate set is empty; pass 'default', 'relaxed' or options like "
                         "'w8a8,w4a4'")
    bad = [o for o in opts if not (2 <= o[0] <= 8 and 2 <= o[1] <= 8)]
    if bad:
        raise ValueError(f"candidate options must have w_bits and a_bits in 2..8, got {bad}")
    return list(dict.fromkeys(opts))


def _parse_option(s: str) -> Option:
    s = s.strip().lower()
    try:
        w, a = s.removeprefix("w").split("a")
        return int(w), int(a)
    except ValueError:
        raise ValueError(f"cannot read candidate option {s!r}; write it as 'w4a8'") from None


@dataclass
class SensitivityTable:
    """Measured loss increases and layer sizes. ``loss`` and ``allowed`` are (L, O) arrays."""

    layers: list[str]
    options: list[Option]
    loss: np.ndarray
    params: np.ndarray
    macs: np.ndarray
    allowed: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.loss = np.asarray(self.loss, dtype=float)
        self.params = np.asarray(self.params, dtype=float)
        self.macs = np.asarray(self.macs, dtype=float)
        self.allowed = np.asarray(self.allowed, dtype=bool)
        shape = (len(self.layers), len(self.options))
        if self.loss.shape != shape or self.allowed.shape != shape:
            raise ValueError(f"loss and allowed must be (layers, options) = {shape}, got "
                             f"{self.loss.shape} and {self.allowed.shape}")
        if not self.options:
            raise ValueError("the candidate set is empty; pass at least one (w_bits, a_bits)")
        empty = [n for n, row in zip(self.layers, self.allowed) if not row.any()]
        if empty:
            raise ValueError(f"layers with no allowed option: {empty}")

    @property
    def w_bits(self) -> np.ndarray:
        return np.array([o[0] for o in self.options], dtype=float)

    @property
    def a_bits(self) -> np.ndarray:
        return np.array([o[1] for o in self.options], dtype=float)

    def size_bits(self) -> np.ndarray:
        """(L, O) model-size contribution in bits: params x w_bits."""
        return self.params[:, None] * self.w_bits[None, :]

    def bops(self) -> np.ndarray:
        """(L, O) bit operations per sample: MACs x w_bits x a_bits."""
        return self.macs[:, None] * (self.w_bits * self.a_bits)[None, :]

    def metric(self, kind: str) -> tuple[np.ndarray, float]:
        """(L, O) cost for a budget kind and the float reference it is divided by."""
        if kind == "compression":
            return self.size_bits(), float(self.params.sum()) * FLOAT_BITS
        if kind == "bops":
            return self.bops(), float(self.macs.sum()) * FLOAT_BITS * FLOAT_BITS
        if kind == "loss":
            return self.loss, 1.0
        raise ValueError(f"unknown budget kind {kind!r}; expected compression, bops or loss")

    def evaluate(self, choice: Sequence[int]) -> dict[str, float]:
        """Predicted loss, compression ratio and BOPs ratio of one option index per layer."""
        idx = (np.arange(len(self.layers)), np.asarray(choice))
        out = {}
        for kind in ("loss", "compression", "bops"):
            cost, ref = self.metric(kind)
            out[kind] = float(cost[idx].sum() / ref)
        return out

    def extreme(self, kind: str, lowest: bool = True) -> float:
        """Smallest (or largest) achievable total of ``kind`` (the feasibility bound)."""
        cost, ref = self.metric(kind)
        masked = np.where(self.allowed, cost, np.inf if lowest else -np.inf)
        return float((masked.min(1) if lowest else masked.max(1)).sum() / ref)

    def reordered(self, layers: Sequence[str]) -> SensitivityTable:
        """The same table with its rows in the order of ``layers`` (same set of names)."""
        if sorted(layers) != sorted(self.layers):
            raise ValueError(f"the table has layers {sorted(set(self.layers) - set(layers))} the "
                             f"model lacks and lacks {sorted(set(layers) - set(self.layers))}; "
                             "measure the table again for this model")
        idx = [self.layers.index(n) for n in layers]
        return SensitivityTable(list(layers), list(self.options), self.loss[idx], self.params[idx],
                                self.macs[idx], self.allowed[idx], dict(self.meta))

    def to_dict(self) -> dict[str, Any]:
        return {"version": TABLE_VERSION, "layers": self.layers,
                "options": [list(o) for o in self.options], "loss": self.loss.tolist(),
                "params": self.params.tolist(), "macs": self.macs.tolist(),
                "allowed": self.allowed.tolist(), "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SensitivityTable:
        if d.get("version") != TABLE_VERSION:
            raise ValueError(f"sensitivity table version {d.get('version')!r} is not supported "
                             f"(expected {TABLE_VERSION}); measure the table again")
        return cls(list(d["layers"]), [(int(w), int(a)) for w, a in d["options"]],
                   np.array(d["loss"]), np.array(d["params"]), np.array(d["macs"]),
                   np.array(d["allowed"]), dict(d.get("meta") or {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass(frozen=True)
class Budget:
    """kind 'compression' / 'bops': ratio to the float model in (0, 1]; 'loss': bound >= 0 on the
    predicted (summed) loss increase (eq. 5b)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in ("compression", "bops", "loss"):
            raise ValueError(f"unknown budget kind {self.kind!r}; expected compression, bops or loss")
        if self.kind != "loss" and not 0.0 < self.value <= 1.0:
            raise ValueError(f"a {self.kind} budget is a ratio to the float model and must be in "
                             f"(0, 1] (all-8-bit weights = 0.25), got {self.value}")
        if self.kind == "loss" and not (math.isfinite(self.value) and self.value >= 0):
            raise ValueError(f"a loss budget must be a finite number >= 0, got {self.value}")


class InfeasibleBudgetError(ValueError):
    """No configuration meets the budget; ``smallest`` is the tightest feasible value."""

    def __init__(self, budget: Budget, smallest: float) -> None:
        self.budget, self.smallest = budget, smallest
        super().__init__(f"no bit configuration meets {budget.kind} <= {budget.value:.6g}: the "
                         f"smallest feasible {budget.kind} with these candidates is "
                         f"{smallest:.6g}; raise the budget or add lower-bit candidates")


@dataclass
class Solution:
    """One option index per layer, with the solver's account of it."""

    choice: list[int]
    method: str
    status: str
    predicted: dict[str, float]
    budget: Budget
    seconds: float = 0.0
    measured: float | None = None  # calibration loss of the stitched model, when measured
    refine: list[dict[str, Any]] = field(default_factory=list)  # context-refinement rounds

    def bits(self, table: SensitivityTable) -> dict[str, Option]:
        return {n: table.options[i] for n, i in zip(table.layers, self.choice)}


def check_feasible(table: SensitivityTable, budget: Budget) -> None:
    smallest = table.extreme(budget.kind, lowest=True)
    if smallest > budget.value * (1 + 1e-9) + 1e-12:
        raise InfeasibleBudgetError(budget, smallest)


def solve_ip(table: SensitivityTable, budget: Budget, time_limit: float = 60.0,
             exclude: Sequence[Sequence[int]] = (),
             near: tuple[Sequence[int], int] | None = None) -> Solution:
    """Exact bit allocation with a MILP solver (HiGHS through scipy.optimize.milp).

    Binary I[l, o] over the allowed pairs, sum_o I[l, o] = 1 per layer (eq. 5d). With a
    compression / BOPs budget: minimise sum dL subject to sum cost <= budget (the paper's
    experiments). With a loss budget: maximise the gain (minimise size, or BOPs when
    ``table.meta['gain'] == 'bops'``) subject to sum dL <= budget (eq. 5a-5c). ``exclude``: choices
    cut off by no-good constraints sum_{l} I[l, choice_l] <= L - 1 (for the k best solutions).
    ``near=(center, k)``: a trust region, at most k layers differ from ``center``
    (sum_l I[l, center_l] >= L - k; used by the context refinement).
    """
    import time

    check_feasible(table, budget)
    t0 = time.perf_counter()
    rows, cols = np.nonzero(table.allowed)
    n, n_layers = len(rows), len(table.layers)
    if budget.kind == "loss":
        objective, _ = table.metric(str(table.meta.get("gain", "compression")))
        constraint, ref = table.loss, 1.0
    else:
        objective = table.loss
        constraint, ref = table.metric(budget.kind)
    c, a = objective[rows, cols], constraint[rows, cols] / ref
    scale_c = float(np.abs(c).max()) or 1.0
    scale_a = float(np.abs(a).max()) or 1.0  # both scaled to O(1) for the solver's tolerances
    one_per_layer = sparse.csr_matrix((np.ones(n), (rows, np.arange(n))), shape=(n_layers, n))
    constraints = [LinearConstraint(one_per_layer, 1, 1),
                   LinearConstraint(a[None, :] / scale_a, -np.inf, budget.value / scale_a)]
    for prev in exclude:
        taken = (np.asarray(prev)[rows] == cols).astype(float)
        constraints.append(LinearConstraint(taken[None, :], -np.inf, n_layers - 1))
    if near is not None:
        kept = (np.asarray(near[0])[rows] == cols).astype(float)
        constraints.append(LinearConstraint(kept[None, :], n_layers - near[1], np.inf))
    res = milp(c / scale_c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
    if res.x is None:
        if exclude and res.status == 2:  # every feasible configuration is already excluded
            raise InfeasibleBudgetError(budget, table.extreme(budget.kind))
        raise RuntimeError(f"the MILP solver returned no solution: {res.message}")
    x = np.round(res.x).astype(int)
    choice = [0] * n_layers
    for k in np.nonzero(x)[0]:
        choice[rows[k]] = int(cols[k])
    return Solution(choice, "ip", str(res.message), table.evaluate(choice), budget,
                    time.perf_counter() - t0)


def ip_alternatives(table: SensitivityTable, budget: Budget, k: int) -> list[Solution]:
    """The ``k`` best distinct IP solutions by predicted objective (fewer when fewer configurations
    meet the budget): the optimum, then each next one with all earlier choices cut off."""
    if k < 1:
        raise ValueError(f"the number of alternatives must be >= 1, got {k}")
    sols = [solve_ip(table, budget)]
    while len(sols) < k:
        try:
            sols.append(solve_ip(table, budget, exclude=[s.choice for s in sols]))
        except InfeasibleBudgetError:
            break
    return sols


def _order_by(table: SensitivityTable, k: int, kind: str) -> list[int]:
    """Allowed options of layer k from the most to the least costly in ``kind`` (ties: more bits
    first), i.e. the order in which greedy methods lower the precision."""
    cost, _ = table.metric(kind if kind != "loss" else "compression")
    idx = [o for o in range(len(table.options)) if table.allowed[k, o]]
    return sorted(idx, key=lambda o: (-cost[k, o], -sum(table.options[o])))


def _fits(table: SensitivityTable, choice: list[int], budget: Budget) -> bool:
    return table.evaluate(choice)[budget.kind] <= budget.value * (1 + 1e-9) + 1e-12


def greedy_accuracy(table: SensitivityTable, budget: Budget) -> Solution:
    """Greedy-accuracy baseline (section 5.4): start with every layer at its most costly option and
    repeatedly lower the least sensitive layer (the smallest loss increase of one step down)."""
    check_feasible(table, budget)
    kind = budget.kind if budget.kind != "loss" else str(table.meta.get("gain", "compression"))
    orders = [_order_by(table, k, kind) for k in range(len(table.layers))]
    pos = [0] * len(table.layers)
    choice = [o[0] for o in orders]
    while budget.kind != "loss" and not _fits(table, choice, budget):
        steps = [(table.loss[k, orders[k][pos[k] + 1]] - table.loss[k, choice[k]], k)
                 for k in range(len(orders)) if pos[k] + 1 < len(orders[k])]
        _, k = min(steps)
        pos[k] += 1
        choice[k] = orders[k][pos[k]]
    while budget.kind == "loss":  # lower while the loss budget allows
        steps = sorted((table.loss[k, orders[k][pos[k] + 1]] - table.loss[k, choice[k]], k)
                       for k in range(len(orders)) if pos[k] + 1 < len(orders[k]))
        trial = next((k for _, k in steps if _fits(table, _moved(choice, k, orders[k][pos[k] + 1]),
                                                   budget)), None)
        if trial is None:
            break
        pos[trial] += 1
        choice[trial] = orders[trial][pos[trial]]
    return Solution(choice, "greedy-accuracy", "greedy", table.evaluate(choice), budget)


def _moved(choice: list[int], k: int, o: int) -> list[int]:
    out = list(choice)
    out[k] = o
    return out


def greedy_compression(table: SensitivityTable, budget: Budget) -> Solution:
    """Greedy-compression baseline (Lin et al., 2016; section 5.4): start with every layer at its
    cheapest option and raise the precision of the layers from the smallest (fewest parameters) to
    the largest, each to the most precise option that still meets the budget. With a loss budget
    the layers are raised until the predicted loss meets it."""
    check_feasible(table, budget)
    kind = budget.kind if budget.kind != "loss" else str(table.meta.get("gain", "compression"))
    orders = [_order_by(table, k, kind) for k in range(len(table.layers))]
    choice = [o[-1] for o in orders]
    for k in np.argsort(table.params, kind="stable"):
        if budget.kind == "loss":
            if _fits(table, choice, budget):
                break
            choice[k] = min(orders[k], key=lambda o: table.loss[k, o])
            continue
        for o in orders[k]:
            if _fits(table, _moved(choice, int(k), o), budget):
                choice[k] = o
                break
    return Solution(choice, "greedy-compression", "greedy", table.evaluate(choice), budget)


def brute_force(table: SensitivityTable, budget: Budget) -> Solution:
    """Exhaustive search (tests only: O^L configurations) with the same objective as solve_ip."""
    check_feasible(table, budget)
    gain = str(table.meta.get("gain", "compression"))
    per_layer = [np.nonzero(row)[0].tolist() for row in table.allowed]
    best: tuple[float, list[int]] | None = None
    for choice in product(*per_layer):
        pred = table.evaluate(choice)
        if pred[budget.kind] > budget.value * (1 + 1e-9) + 1e-12:
            continue
        obj = pred["loss"] if budget.kind != "loss" else pred[gain]
        if best is None or obj < best[0] - 1e-12:
            best = (obj, list(choice))
    if best is None:  # cannot happen after check_feasible, but keep the error readable
        raise InfeasibleBudgetError(budget, table.extreme(budget.kind))
    return Solution(best[1], "brute-force", "optimal", table.evaluate(best[1]), budget)


# ----------------------------------------------------------------------------- context refinement
def changed(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of layers whose option differs between two choices."""
    return int(sum(x != y for x, y in zip(a, b)))


def neighbour_mask(table: SensitivityTable, choice: Sequence[int], mode: str) -> np.ndarray:
    """(L, O) bool: the options the refinement re-measures for each layer, around ``choice``.

    'all': every allowed option but the current one. 'adjacent': allowed options whose weight bits
    and activation bits are each at most one step away from the current ones in the sorted bit
    values of the candidate set (w8a8, w4a4, w3a3, w2a2: w4a4 -> w8a8 and w3a3; 2..8 x 2..8: the
    8 neighbours of a grid point), i.e. a trust region in bit space: O(1) passes per layer even
    with the 49 relaxed options.
    """
    if mode not in ("adjacent", "all"):
        raise ValueError(f"neighbours must be 'adjacent' or 'all', got {mode!r}")
    mask = table.allowed.copy()
    mask[np.arange(len(table.layers)), np.asarray(choice)] = False
    if mode == "all":
        return mask
    w_rank = {b: i for i, b in enumerate(sorted({o[0] for o in table.options}))}
    a_rank = {b: i for i, b in enumerate(sorted({o[1] for o in table.options}))}
    for k, c in enumerate(choice):
        w0, a0 = table.options[c]
        for j, (w, a) in enumerate(table.options):
            if abs(w_rank[w] - w_rank[w0]) > 1 or abs(a_rank[a] - a_rank[a0]) > 1:
                mask[k, j] = False
    return mask


def local_table(table: SensitivityTable, choice: Sequence[int], deltas: np.ndarray) -> SensitivityTable:
    """The IP linearised around a configuration instead of around the float model.

    ``deltas`` (L, O): dL_c[l, o] = L(c with layer l -> o) - L(c), measured with every other layer
    at its option in ``c`` (NaN = not measured). The returned table has loss = dL_c, 0 at the
    current option, and allows only the measured options and the current one, so sum_l dL_c[l, o_l]
    predicts L(c') - L(c) for a nearby c' (first order around c rather than around float, the
    Taylor argument of appendix C applied at c).
    """
    deltas = np.asarray(deltas, dtype=float)
    if deltas.shape != table.loss.shape:
        raise ValueError(f"deltas must be (layers, options) = {table.loss.shape}, got {deltas.shape}")
    idx = (np.arange(len(table.layers)), np.asarray(choice))
    allowed = table.allowed & np.isfinite(deltas)
    allowed[idx] = True
    loss = np.where(allowed, np.nan_to_num(deltas, nan=0.0), 0.0)
    loss[idx] = 0.0
    return SensitivityTable(list(table.layers), list(table.options), loss, table.params, table.macs,
                            allowed, {**table.meta, "local_to": list(map(int, choice))})


SOLVERS = {"ip": solve_ip, "greedy-accuracy": greedy_accuracy,
           "greedy-compression": greedy_compression}
