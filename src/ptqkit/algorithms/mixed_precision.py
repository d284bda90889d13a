"""Mixed precision: sensitivity table -> integer program (or greedy baseline) -> stitched model.

Section 3.2 and appendix D.2 of Hubara et al. The table (``sensitivity.py``) holds the loss
increase of every (layer, option) measured with only that layer lowered; the bit allocation
(``ip.py``) picks one option per layer under a size / BOPs budget (min sum dL) or a loss budget
(max gain, eq. 5). The chosen per-layer states (ranges for those bits, or AdaQuant results for
those bits in the advanced pipeline) are stitched into the model. With ``max_drop`` the choice is
checked on the real model and the loss budget tightened while the measured drop exceeds it.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calib.data import CalibrationData, batch_size_of
from ..nn.modules import QuantModule, quant_layers
from ..nn.prepare import set_layer_bits
from ..ranges import get_range_method
from .base import Context, Step, build_options, register_step
from .ip import (
    SOLVERS,
    Budget,
    InfeasibleBudgetError,
    Option,
    SensitivityTable,
    Solution,
    candidate_options,
    changed,
    check_feasible,
    ip_alternatives,
    local_table,
    neighbour_mask,
    solve_ip,
)
from .sensitivity import (
    LayerState,
    OptionTuner,
    SuffixRunner,
    TableRequest,
    calib_loss,
    measure_in_context,
    measure_table,
    restore,
    sizes_table,
    snapshot,
)

__all__ = ["MixedPrecisionOptions", "MixedPrecision", "Planner", "range_tuner", "TUNERS",
           "closed_loop", "RefineOptions", "refine", "calib_subset"]

log = logging.getLogger(__name__)
STATES_VERSION = 1


@dataclass(frozen=True)
class RefineOptions:
    """Context refinement of an IP solution (beyond the paper; see :func:`refine`).

    rounds: re-measure / re-solve rounds (0 = the paper's IP); a round that finds nothing better
    on the calibration set ends the loop. Default 4: on the issue-5 sweeps (12 IP points) round 3
    was still accepted twice, round 4 never; a round that finds nothing costs one re-measure.
    samples: calibration samples for the re-measurement (None = all; the accept test always uses
    the whole calibration set). neighbours: which options are re-measured per layer ('adjacent'
    bits, or 'all'). backtracks: when the re-solved
    configuration measures worse, re-solve with at most half as many layers changed (trust
    region), this many times per round.
    """

    rounds: int = 4
    samples: int | None = 256
    neighbours: str = "adjacent"
    backtracks: int = 2

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError(f"refine_rounds must be >= 0 (0 = the paper's IP), got {self.rounds}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"refine_samples must be >= 1 or None (all), got {self.samples}")
        if self.neighbours not in ("adjacent", "all"):
            raise ValueError(f"refine_neighbours must be 'adjacent' or 'all', got {self.neighbours!r}")
        if self.backtracks < 0:
            raise ValueError(f"refine_backtracks must be >= 0, got {self.backtracks}")


@dataclass(frozen=True)
class MixedPrecisionOptions:
    """candidates: 'default' {(8,8),(4,4)}, 'relaxed' (2..8 x 2..8) or 'w8a8,w4a4,...'.
    Budget: exactly one of compression / bops (ratios to float, in (0, 1]), loss_budget (eq. 5:
    maximise the ``gain`` subject to the predicted loss increase), or max_drop (closed loop; top-1
    points on labelled calibration data, else calibration-loss units). alternatives: with the IP,
    measure the k best solutions on the calibration set and keep the best measured. pin_first_last: None
    follows the recipe's first/last 8-bit policy; fixed: layer patterns pinned to (w, a).
    tuner: how each candidate's layer state is made ('ranges', or 'adaquant' = parallel
    AdaQuant per bit width, with ``tuner_options`` passed to AdaQuantOptions).
    load_table / save_table: JSON path of the sensitivity table.
    refine_rounds / refine_samples / refine_neighbours: context refinement of the IP solution
    (see :class:`RefineOptions`; refine_rounds=0 is the paper's IP)."""

    candidates: str = "default"
    method: str = "ip"
    compression: float | None = None
    bops: float | None = None
    loss_budget: float | None = None
    max_drop: float | None = None
    max_rounds: int = 4
    alternatives: int = 1
    gain: str = "compression"
    loss: str = "auto"
    pin_first_last: bool | None = None
    fixed: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    tuner: str = "ranges"
    tuner_options: Mapping[str, Any] = field(default_factory=dict)
    load_table: str | None = None
    save_table: str | None = None
    refine_rounds: int = RefineOptions.rounds
    refine_samples: int | None = RefineOptions.samples
    refine_neighbours: str = RefineOptions.neighbours

    def __post_init__(self) -> None:
        candidate_options(self.candidates)
        self.budget()
        self.refine()
        if self.method not in SOLVERS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {sorted(SOLVERS)}")
        if self.gain not in ("compression", "bops"):
            raise ValueError(f"gain must be 'compression' or 'bops', got {self.gain!r}")
        if self.loss not in ("auto", "kl", "ce"):
            raise ValueError(f"loss must be 'auto', 'kl' or 'ce', got {self.loss!r}")
        if self.tuner_options:  # checked now, not when the tuner first runs
            from .adaquant import AdaQuantOptions

            build_options(AdaQuantOptions, self.tuner_options,
                          "step 'mixed_precision' tuner_options (adaquant)")
        if self.tuner not in TUNERS:
            raise ValueError(f"unknown tuner {self.tuner!r}; expected one of {sorted(TUNERS)}")
        if self.alternatives < 1:
            raise ValueError(f"alternatives must be >= 1 (1 = the IP optimum only), got "
                             f"{self.alternatives}")
        if self.max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {self.max_rounds}")
        for name, bits in self.fixed.items():
            if len(bits) != 2:
                raise ValueError(f"fixed bits for {name!r} must be (w_bits, a_bits), got {bits!r}")
            candidate_options([bits])

    def refine(self) -> RefineOptions:
        return RefineOptions(self.refine_rounds, self.refine_samples, self.refine_neighbours)

    def budget(self) -> Budget:
        given = {k: v for k, v in (("compression", self.compression), ("bops", self.bops),
                                   ("loss", self.loss_budget)) if v is not None}
        if self.max_drop is not None:
            if self.max_drop <= 0:
                raise ValueError(f"max_drop must be > 0, got {self.max_drop}")
            if "compression" in given or "bops" in given:
                raise ValueError("max_drop bounds the loss: combine it with loss_budget (a start "
                                 "value) or nothing, not with a compression or BOPs budget")
            return Budget("loss", given.get("loss", self.max_drop))
        if len(given) != 1:
            raise ValueError("give exactly one budget: compression=0.13, bops=..., loss_budget=... "
                             f"or max_drop=...; got {sorted(given) or 'none'}")
        kind, value = next(iter(given.items()))
        return Budget(kind, float(value))


# ----------------------------------------------------------------------------- tuners
def _act_sample(inputs: list[torch.Tensor], max_samples: int, seed: int) -> torch.Tensor:
    x = torch.cat([t.reshape(-1) for t in inputs]).float()
    if x.numel() <= max_samples:
        return x
    idx = torch.randint(0, x.numel(), (max_samples,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([x[idx], x.min().reshape(1), x.max().reshape(1)])


def range_tuner(w_range: str = "mse", a_range: str = "mse", percentile: float = 99.99,
                max_samples: int = 1 << 18, seed: int = 0) -> OptionTuner:
    """Tuner that sets the layer's bits and re-derives both ranges for them (weights per channel,
    the input per tensor from its float values); results are cached per (layer, bits)."""
    cache: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    samples: dict[int, torch.Tensor] = {}

    def opt(method: str) -> dict[str, float]:
        return {"percentile": percentile} if method == "percentile" else {}

    @torch.no_grad()
    def tune(layer: QuantModule, option: Option, inputs: list[torch.Tensor]) -> None:
        set_layer_bits(layer, option[0], option[1])
        key_w, key_a = (id(layer), "w", option[0]), (id(layer), "a", option[1])
        if key_w not in cache:
            w = layer.weight.detach().reshape(layer.out_channels, -1)
            cache[key_w] = get_range_method(w_range)(w, layer.w_quant.spec, **opt(w_range))
        if key_a not in cache:
            if id(layer) not in samples:
                samples[id(layer)] = _act_sample(inputs, max_samples, seed).reshape(1, -1)
            x = samples[id(layer)]
            cache[key_a] = get_range_method(a_range)(x, layer.a_quant.spec, **opt(a_range))
        layer.w_quant.set_range(*cache[key_w])
        layer.a_quant.set_range(*cache[key_a])

    return tune


def _adaquant_tuner(recipe: Mapping[str, Any], seed: int, options: Mapping[str, Any]) -> OptionTuner:
    """Parallel AdaQuant per candidate (section 3.1): ranges for the option's bits, then AdaQuant
    on float inputs against the float layer output, so results for any bits can be stitched."""
    from .adaquant import AdaQuantOptions, adaquant_layer

    base = _range_tuner(recipe, seed, {})
    opts = AdaQuantOptions(**{**dict(options), "mode": "parallel"})

    def tune(layer: QuantModule, option: Option, inputs: list[torch.Tensor]) -> None:
        base(layer, option, inputs)
        with torch.no_grad():
            pairs = [(x, layer.op(x, layer.weight, layer.bias)) for x in inputs]
        adaquant_layer(layer, pairs, options=opts, generator=torch.Generator().manual_seed(seed))

    return tune


def _range_tuner(recipe: Mapping[str, Any], seed: int, options: Mapping[str, Any]) -> OptionTuner:
    return range_tuner(recipe.get("w_range", "mse"), recipe.get("a_range", "mse"),
                       recipe.get("percentile", 99.99), seed=seed)


# name -> factory(recipe dict, seed, tuner_options) -> OptionTuner
TUNERS: dict[str, Callable[[Mapping[str, Any], int, Mapping[str, Any]], OptionTuner]] = {
    "ranges": _range_tuner,
    "adaquant": _adaquant_tuner,
}


# ----------------------------------------------------------------------------- planner
def allowed_options(layers: list[str], opts: MixedPrecisionOptions,
                    pin_first_last: bool) -> tuple[list[Option], dict[str, list[Option]]]:
    """Candidate options per layer: pinned layers (fixed patterns, first/last) get one."""
    unknown = [p for p in opts.fixed if not any(fnmatch.fnmatchcase(n, p) for n in layers)]
    if unknown:
        raise ValueError(f"fixed bits name no quantized layer: {unknown}; quantized layers are: "
                         f"{', '.join(layers)}")
    cands = candidate_options(opts.candidates)
    allowed = {n: list(cands) for n in layers}
    if pin_first_last and layers:
        for n in {layers[0], layers[-1]}:
            allowed[n] = [(8, 8)]
    for pattern, bits in opts.fixed.items():
        for n in layers:
            if fnmatch.fnmatchcase(n, pattern):
                allowed[n] = [(int(bits[0]), int(bits[1]))]
    options = list(dict.fromkeys(cands + [o for v in allowed.values() for o in v]))
    return options, allowed


class Planner:
    """A model with its measured table and per-(layer, option) states, ready to solve many budgets
    (the sweep reuses one planner across compressions)."""

    def __init__(self, model: nn.Module, calib: CalibrationData, float_out: list[torch.Tensor],
                 loss: str, tuner: OptionTuner) -> None:
        self.model, self.calib, self.float_out, self.tuner = model, calib, float_out, tuner
        self.loss = ("ce" if calib.has_labels else "kl") if loss == "auto" else loss
        if self.loss == "ce" and not calib.has_labels:
            raise ValueError("loss='ce' needs labelled calibration batches (inputs, labels); "
                             "use loss='kl' (label-free) instead")
        self.table: SensitivityTable | None = None
        self.states: dict[tuple[str, Option], LayerState] = {}
        self.originals = {n: snapshot(m) for n, m in quant_layers(model).items()}
        self._runner: SuffixRunner | None = None

    def measure(self, options: list[Option], allowed: dict[str, list[Option]]) -> SensitivityTable:
        request = TableRequest(options, allowed, self.loss, self.tuner)
        self.table, self.states = measure_table(self.model, self.calib, self.float_out, request)
        return self.table

    def use_table(self, table: SensitivityTable,
                  states: dict[tuple[str, Option], LayerState] | None = None) -> None:
        """Re-solve with a saved table (rows matched to this model's layers by name) and, when
        given, the saved per-(layer, option) states, so nothing is measured or tuned again."""
        self.table = table.reordered(list(quant_layers(self.model)))
        self.states = dict(states or {})

    def save_states(self, path: str | Path) -> None:
        """The tuned per-(layer, option) states (ranges, AdaQuant weights) as a torch file."""
        items = [{"layer": n, "option": list(o), "tensors": st.tensors}
                 for (n, o), st in self.states.items()]
        torch.save({"version": STATES_VERSION, "states": items}, path)

    @staticmethod
    def load_states(path: str | Path) -> dict[tuple[str, Option], LayerState]:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("version") != STATES_VERSION:
            raise ValueError(f"{path}: not a ptqkit layer-state file of version {STATES_VERSION}; "
                             "delete it to tune again")
        out = {}
        for item in data["states"]:
            opt = (int(item["option"][0]), int(item["option"][1]))
            out[(str(item["layer"]), opt)] = LayerState(opt, dict(item["tensors"]))
        return out

    def solve(self, budget: Budget, method: str = "ip") -> Solution:
        if self.table is None:
            raise RuntimeError("measure() or use_table() first")
        return SOLVERS[method](self.table, budget)

    def solve_measured(self, budget: Budget, method: str = "ip", alternatives: int = 1,
                       model: nn.Module | None = None, refine_opts: RefineOptions | None = None,
                       ) -> tuple[Solution, list[dict[str, float]]]:
        """With ``alternatives`` k > 1 and the IP: the k best IP solutions by predicted loss, each
        stitched into ``model`` and measured on the calibration set; the one with the lowest
        measured loss wins (additivity is approximate, so near-optimal configurations are ranked
        by the real model). Then, with ``refine_opts.rounds`` > 0 and the IP, the winner is
        refined in context (:func:`refine`). ``model`` is left holding the result. Returns it and
        one record per alternative (predicted and measured loss, compression)."""
        sol, records = self._alternatives(budget, method, alternatives, model)
        if method == "ip" and refine_opts is not None and refine_opts.rounds > 0:
            sol = refine(self, sol, self.model if model is None else model, refine_opts)
        return sol, records

    def _alternatives(self, budget: Budget, method: str, alternatives: int,
                      model: nn.Module | None) -> tuple[Solution, list[dict[str, float]]]:
        if method != "ip" or alternatives <= 1:
            sol = self.solve(budget, method)
            self.apply(sol, model)
            return sol, []
        assert self.table is not None
        sols, records = ip_alternatives(self.table, budget, alternatives), []
        for sol in sols:
            measured = self.measured_loss(self.apply(sol, model))
            records.append({"predicted_loss": sol.predicted["loss"], "measured_loss": measured,
                            "compression": sol.predicted["compression"]})
        best = min(range(len(sols)), key=lambda i: records[i]["measured_loss"])
        log.info("IP alternatives: predicted %s, measured %s; picked #%d",
                 [f"{r['predicted_loss']:.4g}" for r in records],
                 [f"{r['measured_loss']:.4g}" for r in records], best)
        self.apply(sols[best], model)
        sols[best].measured = records[best]["measured_loss"]
        return sols[best], records

    def apply(self, solution: Solution, model: nn.Module | None = None) -> nn.Module:
        """Stitch the chosen per-layer states into ``model`` (default: the planner's model)."""
        model = self.model if model is None else model
        if self.table is None:
            raise RuntimeError("measure() or use_table() first")
        layers = quant_layers(model)
        for name, option in solution.bits(self.table).items():
            self.put(layers[name], name, option)
        return model

    def put(self, layer: QuantModule, name: str, option: Option) -> None:
        """Put layer ``name`` (a module of any copy of the planner's model) in its tuned state for
        ``option``; a state missing (table loaded from disk) is tuned now and kept."""
        if (name, option) not in self.states:
            if self._runner is None:
                self._runner = SuffixRunner(self.model, self.calib)
            self.states[(name, option)] = self._tune(self._runner, name, option)
        restore(layer, self.originals[name])
        restore(layer, self.states[(name, option)])

    @torch.no_grad()
    def _tune(self, runner: SuffixRunner, name: str, option: Option) -> LayerState:
        layer = quant_layers(self.model)[name]
        inputs = runner.inputs(name, runner.cache(name))
        restore(layer, self.originals[name])
        try:
            with torch.enable_grad():
                self.tuner(layer, option, inputs)
            return snapshot(layer, self.originals[name].tensors)
        finally:
            restore(layer, self.originals[name])

    @torch.no_grad()
    def measured_loss(self, model: nn.Module) -> float:
        outs = (self.calib.forward(model, b) for b in self.calib)
        return calib_loss(self.calib, self.float_out, outs, self.loss)

    @torch.no_grad()
    def drop(self, model: nn.Module) -> float:
        """Closed-loop metric: top-1 points lost on labelled calibration data, else the loss."""
        if not self.calib.has_labels:
            return self.measured_loss(model)
        hits_f = hits_q = 0
        for b, ref in zip(self.calib, self.float_out):
            y = _labels(self.calib, b)
            hits_f += int((ref.argmax(-1) == y).sum())
            hits_q += int((self.calib.forward(model, b).argmax(-1) == y).sum())
        return 100.0 * (hits_f - hits_q) / self.calib.num_samples


def _labels(calib: CalibrationData, batch: Any) -> torch.Tensor:
    y = calib.labels(batch)
    if y is None:
        raise ValueError("this calibration batch has no labels; use the label-free loss 'kl'")
    return y


def closed_loop(planner: Planner, max_drop: float, start: Budget, method: str = "ip",
                max_rounds: int = 4, refine_opts: RefineOptions | None = None,
                ) -> tuple[Solution, list[dict[str, Any]]]:
    """Solve eq. 5 with a loss budget, apply (and, with ``refine_opts``, refine in context at the
    solution's size), measure the real drop; while it exceeds ``max_drop`` (additivity failed),
    shrink the loss budget by the observed over-shoot and re-solve. Returns the last solution
    applied and one record per round."""
    budget, rounds = start, []
    assert planner.table is not None
    for r in range(max_rounds):
        try:
            sol = planner.solve(budget, method)
        except InfeasibleBudgetError as err:
            sol = planner.solve(Budget("loss", err.smallest), method)
        planner.apply(sol)
        if method == "ip" and refine_opts is not None and refine_opts.rounds > 0:
            sol = refine(planner, sol, planner.model, refine_opts)
        measured = planner.drop(planner.model)
        rounds.append({"round": r, "loss_budget": budget.value, "predicted_loss": sol.predicted["loss"],
                       "measured_drop": measured, "compression": sol.predicted["compression"],
                       "refine": sol.refine})
        log.info("closed loop round %d: budget %.4g, predicted %.4g, measured drop %.4g", r,
                 budget.value, sol.predicted["loss"], measured)
        if measured <= max_drop or budget.value <= planner.table.extreme("loss"):
            break
        shrink = min(0.9, max(0.1, max_drop / max(measured, 1e-12)))
        budget = Budget("loss", max(planner.table.extreme("loss"), sol.predicted["loss"] * shrink))
    return sol, rounds


# ----------------------------------------------------------------------------- context refinement
def calib_subset(calib: CalibrationData, float_out: list[torch.Tensor],
                 n: int | None) -> tuple[CalibrationData, list[torch.Tensor]]:
    """About ``n`` samples taken evenly from every batch (so a class-ordered loader still gives a
    mixed subset), with the matching float outputs; the whole set when ``n`` is None or larger."""
    if n is None or n >= calib.num_samples:
        return calib, float_out
    batches, refs = [], []
    for b, ref in zip(calib, float_out):
        k = max(1, round(batch_size_of(b) * n / calib.num_samples))
        batches.append(CalibrationData([b], limit=k).batches[0])
        refs.append(ref[:k])
    return CalibrationData(batches, forward_fn=calib.forward_fn), refs


def _refine_budget(table: SensitivityTable, sol: Solution) -> Budget:
    """Refinement keeps the size: the same compression / BOPs budget, or for a loss budget (eq. 5)
    the gain the solution reached (its loss is then lowered at no larger size)."""
    if sol.budget.kind != "loss":
        return sol.budget
    kind = str(table.meta.get("gain", "compression"))
    return Budget(kind, min(1.0, sol.predicted[kind] * (1 + 1e-9)))


def refine(planner: Planner, solution: Solution, model: nn.Module, opts: RefineOptions) -> Solution:
    """IP with layer interactions (beyond the paper): re-linearise around the current solution.

    Each round measures dL_c[l, o] = L(c with l -> o) - L(c) for the neighbour options of every
    layer with all other layers as chosen (:func:`~.sensitivity.measure_in_context`, on
    ``opts.samples`` calibration samples), re-solves the IP on these local deltas under the same
    budget, and accepts the new configuration only if its loss measured on the whole calibration
    set is lower; if not, it re-solves with at most half as many layers changed (trust region,
    ``opts.backtracks`` times). A round with nothing better stops the loop, so the result is never
    worse on the calibration set than ``solution``. ``model`` must hold ``solution``; it is left
    holding the result. The returned Solution's ``refine`` lists every round and attempt.
    """
    assert planner.table is not None
    t0 = time.perf_counter()
    budget, sub = _refine_budget(planner.table, solution), calib_subset(planner.calib,
                                                                        planner.float_out, opts.samples)
    choice = list(solution.choice)
    best = solution.measured if solution.measured is not None else planner.measured_loss(model)
    rounds: list[dict[str, Any]] = [{"round": 0, "predicted_loss": solution.predicted["loss"],
                                     "measured_loss": best, "accepted": True}]
    for r in range(1, opts.rounds + 1):
        rec = _refine_round(planner, model, choice, best, budget, sub, opts)
        rounds.append({"round": r, **{k: v for k, v in rec.items() if k != "choice"},
                       "measured_loss": rec.get("measured_loss", best)})  # loss after the round
        log.info("IP refinement round %d: %s", r, _round_text(rec, best))
        if not rec["accepted"]:
            break
        choice, best = rec["choice"], rec["measured_loss"]
    status = f"{solution.status}; refined in context ({sum(x['accepted'] for x in rounds[1:])} " \
             f"of {len(rounds) - 1} rounds accepted)"
    return Solution(choice, solution.method, status, planner.table.evaluate(choice), solution.budget,
                    solution.seconds + time.perf_counter() - t0, best, rounds)


def _round_text(rec: dict[str, Any], best: float) -> str:
    tries = ", ".join(f"{a['changed']} changed: predicted {a['predicted_loss']:.4g} measured "
                      f"{a['measured_loss']:.4g}" for a in rec["attempts"])
    return f"from {best:.4g}: {tries or 'no move predicted to help'}; accepted={rec['accepted']}"


def _refine_round(planner: Planner, model: nn.Module, choice: list[int], best: float, budget: Budget,
                  sub: tuple[CalibrationData, list[torch.Tensor]],
                  opts: RefineOptions) -> dict[str, Any]:
    """One re-measure / re-solve round; ``model`` holds ``choice`` again unless accepted."""
    table = planner.table
    assert table is not None
    deltas, subset_loss, n_probes = _context_deltas(planner, model, choice, sub, opts.neighbours)
    local = local_table(table, choice, deltas)
    rec: dict[str, Any] = {"subset_loss": subset_loss, "probes": n_probes, "attempts": [],
                           "accepted": False, **_interaction(table, choice, deltas)}
    limit: int | None = None
    for _ in range(opts.backtracks + 1):
        sol = solve_ip(local, budget, near=None if limit is None else (choice, limit))
        k = changed(sol.choice, choice)
        if k == 0 or sol.predicted["loss"] >= 0.0:  # no move predicted to lower the loss
            break
        measured = planner.measured_loss(planner.apply(sol, model))
        rec["attempts"].append({"changed": k, "predicted_loss": best + sol.predicted["loss"],
                                "measured_loss": measured, "compression": sol.predicted["compression"],
                                "additive_predicted": table.evaluate(sol.choice)["loss"]})
        if measured < best:
            return {**rec, "accepted": True, "choice": sol.choice, "measured_loss": measured}
        limit = k // 2
        if limit < 1:
            break
    if rec["attempts"]:
        planner.apply(Solution(choice, "ip", "", {}, budget), model)
    return rec


def _interaction(table: SensitivityTable, choice: list[int], deltas: np.ndarray) -> dict[str, float]:
    """How the context deltas compare with the table's (float-context) deltas for the same moves:
    the median ratio dL_c[l, o] / (dL[l, o] - dL[l, c_l]) over probes whose table delta is not ~0
    (1 = additive; a uniform factor > 1 scales both sides of every trade and leaves the IP's
    choice unchanged), and the most negative context delta (the best single move)."""
    rows = np.arange(len(table.layers))
    base = table.loss[rows, np.asarray(choice)][:, None]
    additive = table.loss - base
    probed = np.isfinite(deltas) & (np.abs(additive) > 1e-9)
    ratio = float(np.median(deltas[probed] / additive[probed])) if probed.any() else float("nan")
    best = float(np.nanmin(deltas)) if np.isfinite(deltas).any() else float("nan")
    return {"delta_ratio_median": ratio, "best_single_move": best}


def _context_deltas(planner: Planner, model: nn.Module, choice: list[int],
                    sub: tuple[CalibrationData, list[torch.Tensor]],
                    neighbours: str) -> tuple[np.ndarray, float, int]:
    """(L, O) dL_c for the neighbour options (NaN elsewhere), L(c) on the subset, probe count."""
    table = planner.table
    assert table is not None
    mask = neighbour_mask(table, choice, neighbours)
    layers = quant_layers(model)
    current = {n: table.options[c] for n, c in zip(table.layers, choice)}
    probes = {n: [table.options[o] for o in np.nonzero(mask[i])[0]] for i, n in enumerate(table.layers)}
    order = [n for n in layers if n in probes]  # execution order of this model

    def switch(name: str, option: Option | None) -> None:
        planner.put(layers[name], name, current[name] if option is None else option)

    base, measured = measure_in_context(model, sub[0], sub[1], planner.loss,
                                        {n: probes[n] for n in order}, switch)
    deltas = np.full(table.loss.shape, np.nan)
    for (name, option), d in measured.items():
        deltas[table.layers.index(name), table.options.index(option)] = d
    return deltas, base, len(measured)


# ----------------------------------------------------------------------------- the step
@register_step
class MixedPrecision(Step[MixedPrecisionOptions]):
    """Sensitivity table, bit allocation, stitching; reports expected vs measured degradation."""

    name = "mixed_precision"
    Options = MixedPrecisionOptions
    effects = frozenset({"tunes_ranges", "changes_weights", "changes_bits"})

    def run(self, ctx: Context) -> dict[str, Any]:
        o: MixedPrecisionOptions = self.options
        t0 = time.perf_counter()
        r = ctx.recipe
        pin = (r.first_last_8bit if r else True) if o.pin_first_last is None else o.pin_first_last
        ranges = {"w_range": r.w_range, "a_range": r.a_range, "percentile": r.percentile} if r else {}
        planner = Planner(ctx.qmodel, ctx.calib, ctx.float_outputs(), o.loss,
                          TUNERS[o.tuner](ranges, ctx.seed, o.tuner_options))
        options, allowed = allowed_options(list(ctx.layers()), o, bool(pin))
        if o.load_table:
            planner.use_table(SensitivityTable.load(o.load_table))
        else:
            if o.max_drop is None and o.budget().kind in ("compression", "bops"):
                # fail in seconds, not after the table: the sizes alone decide feasibility
                check_feasible(sizes_table(ctx.qmodel, ctx.calib, options, allowed), o.budget())
            planner.measure(options, allowed)
        assert planner.table is not None
        planner.table.meta["gain"] = o.gain
        if o.save_table:
            planner.table.save(o.save_table)
        t_table = time.perf_counter() - t0
        rounds: list[dict[str, Any]] = []
        if o.max_drop is not None:
            sol, rounds = closed_loop(planner, o.max_drop, o.budget(), o.method, o.max_rounds,
                                      o.refine())
        else:
            sol, alts = planner.solve_measured(o.budget(), o.method, o.alternatives,
                                               refine_opts=o.refine())
            rounds = [{"alternative": i, **r} for i, r in enumerate(alts)]
        return self._summary(planner, sol, rounds, ctx, t_table)

    def _summary(self, planner: Planner, sol: Solution, rounds: list[dict[str, Any]],
                 ctx: Context, t_table: float) -> dict[str, Any]:
        assert planner.table is not None
        bits = sol.bits(planner.table)
        for i, name in enumerate(bits):
            ctx.report.layer(name)["mp_dL"] = float(planner.table.loss[i, sol.choice[i]])
        measured = planner.measured_loss(ctx.qmodel)
        ctx.report.notes.append(
            f"mixed precision ({sol.method}, {sol.status}): {sol.budget.kind} budget "
            f"{sol.budget.value:.4g}; compression {sol.predicted['compression']:.4f}; "
            f"expected {planner.loss} increase {sol.predicted['loss']:.4g}, measured {measured:.4g}")
        return {"method": sol.method, "status": sol.status, "budget": vars(sol.budget),
                "predicted": sol.predicted, "measured_loss": measured, "loss": planner.loss,
                "bits": {n: f"w{w}a{a}" for n, (w, a) in bits.items()}, "rounds": rounds,
                "refine": sol.refine,
                "solve_seconds": sol.seconds, "table_seconds": t_table,
                "table": planner.table.to_dict()}
