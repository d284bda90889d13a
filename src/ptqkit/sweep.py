"""Compression-accuracy curves (Fig. 3 of Hubara et al.) for the zoo suites.

For one suite the sensitivity table is measured once per kind of per-layer state ('ranges' for
greedy-accuracy / greedy-compression / ip / light, 'adaquant' for advanced) and reused for every
compression: each (method, compression) point only solves, stitches a copy of the model, runs the
method's global steps (BN tuning, bias tuning) and evaluates on the test split.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import bench
from .algorithms import STEPS
from .algorithms.base import Cache, Context, Report, options_from_dict
from .algorithms.ip import Budget, InfeasibleBudgetError, SensitivityTable, Solution
from .algorithms.mixed_precision import (
    TUNERS,
    MixedPrecisionOptions,
    Planner,
    RefineOptions,
    allowed_options,
)
from .calib.data import CalibrationData
from .evaluate import compression_ratio
from .nn.control import float_weights
from .nn.modules import quant_layers
from .pipeline import Recipe, StepSpec, quantize
from .plotting import pyplot

__all__ = ["SweepMethod", "SWEEP_METHODS", "SweepConfig", "run_sweep", "plot_curves",
           "with_mixed_precision"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepMethod:
    """tuner: per-layer state of each candidate; solver: ip / greedy-*; post: global steps."""

    tuner: str
    solver: str
    post: tuple[str, ...] = ()


SWEEP_METHODS: dict[str, SweepMethod] = {
    "greedy-accuracy": SweepMethod("ranges", "greedy-accuracy"),
    "greedy-compression": SweepMethod("ranges", "greedy-compression"),
    "ip": SweepMethod("ranges", "ip"),
    "light": SweepMethod("ranges", "ip", ("bn_tuning",)),
    "advanced": SweepMethod("adaquant", "ip", ("bn_tuning", "bias_tuning")),
}


@dataclass(frozen=True)
class SweepConfig:
    """candidates: the options every layer may take (see ip.candidate_options); the first and
    last layers stay at w8a8 unless first_last_8bit is False."""

    compressions: tuple[float, ...] = (0.25, 0.2, 0.16, 0.14, 0.13, 0.12)
    methods: tuple[str, ...] = tuple(SWEEP_METHODS)
    candidates: str = "w8a8,w4a4,w3a3,w2a2"
    first_last_8bit: bool = True
    calib_size: int = 1000
    seed: int = 0
    data_dir: str | None = None
    tuner_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    table_dir: str | None = None
    alternatives: int = 4
    post_guard: bool = False
    refine: RefineOptions = RefineOptions()

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in SWEEP_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown sweep method(s) {unknown or 'none given'}; expected any of "
                             f"{', '.join(SWEEP_METHODS)}")
        if not self.compressions:
            raise ValueError("give at least one compression, e.g. --compressions 0.25,0.13")
        for c in self.compressions:
            Budget("compression", c)
        MixedPrecisionOptions(candidates=self.candidates, compression=0.25,
                              alternatives=self.alternatives)

    def table_key(self, tuner: str) -> dict[str, Any]:
        """What a saved table depends on besides the model: reloaded only when this matches."""
        return {"tuner": tuner, "tuner_options": dict(self.tuner_options.get(tuner, {})),
                "candidates": self.candidates, "first_last_8bit": self.first_last_8bit,
                "calib_size": self.calib_size, "seed": self.seed}


def with_mixed_precision(recipe: Recipe, **options: Any) -> Recipe:
    """The recipe with its mixed_precision step options updated (e.g. compression=0.13);
    a budget given here replaces the preset's budget."""
    budgets = {"compression", "bops", "loss_budget", "max_drop"}
    steps, found = [], False
    for s in recipe.steps:
        if s.name == "mixed_precision":
            found = True
            base = dict(s.options)
            if budgets & set(options):
                base = {k: v for k, v in base.items() if k not in budgets}
            s = StepSpec(s.name, {**base, **options})
        steps.append(s)
    if not found:
        raise ValueError("the recipe has no mixed_precision step; use --pipeline light or advanced")
    return dataclasses.replace(recipe, steps=tuple(steps))


def _base_model(suite: bench.Suite, calib: CalibrationData, cfg: SweepConfig) -> nn.Module:
    """The prepared model (BN folded, layers swapped). Its ranges do not matter: every point
    stitches a tuned state into every layer, so the cheap min-max ranges are enough here (the
    tuners use the ranges of ``_tuner_recipe``)."""
    recipe = Recipe(w_bits=8, a_bits=8, first_last_8bit=cfg.first_last_8bit, seed=cfg.seed,
                    w_range="minmax", a_range="minmax")
    return quantize(suite.float_model, calib, recipe, forward_fn=suite.forward_fn)


def _tuner_recipe(cfg: SweepConfig) -> dict[str, Any]:
    """The recipe the tuners take their range methods from (the defaults: MSE ranges)."""
    return Recipe(first_last_8bit=cfg.first_last_8bit, seed=cfg.seed).to_dict()


@torch.no_grad()
def _float_outputs(model: nn.Module, calib: CalibrationData) -> list[torch.Tensor]:
    from .nn.control import quantizers_disabled

    with quantizers_disabled(model):
        return [calib.forward(model, b) for b in calib]


def _planner(suite: bench.Suite, base: nn.Module, calib: CalibrationData, float_out: list[torch.Tensor],
             tuner: str, cfg: SweepConfig) -> Planner:
    """A planner with its table: loaded from ``cfg.table_dir`` (with the tuned layer states saved
    beside it) when it was measured for the same settings, else measured and saved there."""
    recipe = _tuner_recipe(cfg)
    factory = TUNERS[tuner]
    planner = Planner(base, calib, float_out, "auto",
                      factory(recipe, cfg.seed, dict(cfg.tuner_options.get(tuner, {}))))
    mp = MixedPrecisionOptions(candidates=cfg.candidates, compression=0.25)
    options, allowed = allowed_options(list(quant_layers(base)), mp, cfg.first_last_8bit)
    paths = _table_paths(cfg, suite.name, tuner)
    saved = _load_table(paths, options, allowed, cfg.table_key(tuner), calib.num_samples)
    if saved is not None and paths is not None:
        states = Planner.load_states(paths[1]) if paths[1].is_file() else {}
        planner.use_table(saved, states)  # measured before: re-solve without re-measuring
        log.info("%s: %s sensitivity table loaded from %s (%d tuned layer states)", suite.name,
                 tuner, paths[0], len(states))
        return planner
    t0 = time.perf_counter()
    table = planner.measure(options, allowed)
    table.meta.update(seconds=time.perf_counter() - t0, sweep_key=cfg.table_key(tuner))
    _save_planner(planner, paths)
    log.info("%s: %s sensitivity table in %.1fs", suite.name, tuner, table.meta["seconds"])
    return planner


def _table_paths(cfg: SweepConfig, suite: str, tuner: str) -> tuple[Path, Path] | None:
    if not cfg.table_dir:
        return None
    d = Path(cfg.table_dir)
    return d / f"{suite}-{tuner}.json", d / f"{suite}-{tuner}.states.pt"


def _load_table(paths: tuple[Path, Path] | None, options: list[Any], allowed: dict[str, list[Any]],
                key: dict[str, Any], calib_samples: int) -> SensitivityTable | None:
    """The saved table if it fits: same options, same layers (any order: rows are matched by
    name), same allowed options per layer and, when recorded, the same settings."""
    if paths is None or not paths[0].is_file():
        return None
    t = SensitivityTable.load(paths[0])
    fits = (t.options == options and sorted(t.layers) == sorted(allowed)
            and all(t.allowed[i].tolist() == [o in allowed[n] for o in options]
                    for i, n in enumerate(t.layers))
            and t.meta.get("sweep_key", key) == key
            and t.meta.get("calib_samples", calib_samples) == calib_samples)
    if not fits:
        log.warning("%s was measured for other settings; measuring again", paths[0])
    return t if fits else None


def _save_planner(planner: Planner, paths: tuple[Path, Path] | None) -> None:
    """Table (JSON) and tuned layer states (torch file), each written atomically."""
    if paths is None or planner.table is None:
        return
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    for path, write in ((paths[0], planner.table.save), (paths[1], planner.save_states)):
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)


def _post_steps(model: nn.Module, planner: Planner, steps: Sequence[str], loss: float,
                cfg: SweepConfig) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Run the global steps in order, measuring the calibration loss after each. With
    ``cfg.post_guard`` a step that raises the calibration loss is undone (the copy taken before
    it is kept), so the result is never worse than the stitched model on the calibration set."""
    out = []
    for name in steps:
        before = copy.deepcopy(model) if cfg.post_guard else None
        ctx = Context(model, planner.calib, Report(), cfg.seed,
                      Cache(float_outputs=planner.float_out,
                            float_weights=float_weights(planner.model)))  # the unstitched base
        t0 = time.perf_counter()
        summary = STEPS[name](options_from_dict(STEPS[name], {})).run(ctx)
        summary["seconds"] = time.perf_counter() - t0
        after = planner.measured_loss(model)
        kept = before is None or after <= loss
        out.append({"step": name,  # the sweep's own verdict overrides a step's "kept"
                    **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))},
                    "calib_loss": after, "kept": kept})
        if kept:
            loss = after
        else:
            model = before  # type: ignore[assignment]
    return model, out


def _point(suite: bench.Suite, planner: Planner, base: nn.Module, method: str, c: float,
           cfg: SweepConfig, seen: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    m = SWEEP_METHODS[method]
    row: dict[str, Any] = {"suite": suite.name, "method": method, "budget": c,
                           "candidates": cfg.candidates, "fp32_top1": suite.fp32_top1}
    t0 = time.perf_counter()
    model = copy.deepcopy(base)
    try:
        sol, alts = _solve(planner, m, c, cfg, model, seen)
    except InfeasibleBudgetError as err:
        return {**row, "error": str(err), "smallest_feasible": err.smallest}
    key = (tuple(sol.choice), m.tuner, m.post)
    if key in seen:  # same configuration as an earlier point (e.g. all-8-bit): same numbers
        return {**seen[key], **row, "status": sol.status, "same_as": seen[key]["method"],
                "alternatives": alts, "refine": sol.refine, "refine_options": _refine_opts(m, cfg),
                "seconds": time.perf_counter() - t0}
    expected = sol.predicted["loss"]
    measured_ip = sol.measured if sol.measured is not None else planner.measured_loss(model)
    model, post = _post_steps(model, planner, m.post, measured_ip, cfg)
    res = suite.evaluate(model)
    assert planner.table is not None
    seen[key] = {
        **row, "quant_top1": res.get("top1"), "delta": _delta(res), "agreement": res["agreement"],
        "kl": res["kl"], "compression": sol.predicted["compression"],
        "model_compression": compression_ratio(model), "bops": sol.predicted["bops"],
        "status": sol.status, "expected_calib_loss": expected, "measured_calib_loss": measured_ip,
        "calib_loss_after_post": next((p["calib_loss"] for p in reversed(post) if p["kept"]),
                                      measured_ip),
        "post": [p["step"] for p in post if p["kept"]], "post_steps": post, "alternatives": alts,
        "refine": sol.refine, "refine_options": _refine_opts(m, cfg),
        "bits": {k: f"w{w}a{a}" for k, (w, a) in sol.bits(planner.table).items()},
        "seconds": time.perf_counter() - t0}
    return seen[key]


def _refine_opts(m: SweepMethod, cfg: SweepConfig) -> dict[str, Any] | None:
    return dataclasses.asdict(cfg.refine) if m.solver == "ip" else None


def _solve(planner: Planner, m: SweepMethod, c: float, cfg: SweepConfig, model: nn.Module,
           seen: dict[Any, Any]) -> tuple[Solution, list[dict[str, float]]]:
    """Solve (and, for the IP, rank the alternatives on the calibration set) once per (tuner,
    solver, budget): light reuses the choice of ip, which it shares before BN tuning."""
    key = ("solved", m.tuner, m.solver, c)
    if key not in seen:
        seen[key] = planner.solve_measured(Budget("compression", c), m.solver, cfg.alternatives,
                                           model, cfg.refine)
    else:
        planner.apply(seen[key][0], model)
    return seen[key]  # type: ignore[no-any-return]


def _delta(res: dict[str, Any]) -> float | None:
    if res.get("top1") is None or res.get("fp32_top1") is None:
        return None
    return float(res["top1"] - res["fp32_top1"])


def run_sweep(suite_name: str, cfg: SweepConfig,
              on_row: Callable[[dict[str, Any]], None] | None = None,
              done: Collection[tuple[str, float | None]] = ()) -> list[dict[str, Any]]:
    """Rows: one per (method, compression), plus one 'table' row per measured sensitivity table.

    Compressions are the outer loop (in the order given) so that a sweep cut short still compares
    every method at the first compressions; a table is measured when a method first needs it.
    ``on_row`` sees every row as soon as it exists (e.g. to save partial results); ``done``:
    (method, budget) points already measured (table rows: budget None), skipped (resume).
    """
    if suite_name not in bench.SUITES:
        raise ValueError(f"unknown suite {suite_name!r}; expected one of {', '.join(sorted(bench.SUITES))}")
    points = [(c, m) for c in cfg.compressions for m in cfg.methods if (m, c) not in done]
    if not points:
        log.info("%s: every point is done already", suite_name)
        return []
    suite = bench.SUITES[suite_name](bench.BenchConfig(first_last_8bit=cfg.first_last_8bit,
                                                       calib_size=cfg.calib_size, seed=cfg.seed,
                                                       data_dir=cfg.data_dir))
    calib = suite.calib(cfg.calib_size, cfg.seed)
    base = _base_model(suite, calib, cfg)
    float_out = _float_outputs(base, calib)
    rows: list[dict[str, Any]] = []
    runners: dict[str, Planner] = {}
    seen: dict[Any, dict[str, Any]] = {}

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for c, m in tqdm(points, desc=f"sweep {suite.name}", disable=None):
        tuner = SWEEP_METHODS[m].tuner
        if tuner not in runners:
            runners[tuner] = _planner(suite, base, calib, float_out, tuner, cfg)
            if (f"table:{tuner}", None) not in done:
                emit(_table_row(suite.name, tuner, runners[tuner].table))  # type: ignore[arg-type]
        n_states = len(runners[tuner].states)
        emit(_point(suite, runners[tuner], base, m, c, cfg, seen))
        if len(runners[tuner].states) > n_states:  # tuned lazily (loaded table): keep them too
            _save_planner(runners[tuner], _table_paths(cfg, suite.name, tuner))
        log.info("%s %s @%.3f: top-1 %s (float %.2f)", suite.name, m, c,
                 rows[-1].get("quant_top1"), suite.fp32_top1)
    return rows


def _table_row(suite: str, tuner: str, table: SensitivityTable) -> dict[str, Any]:
    return {"suite": suite, "method": f"table:{tuner}", "layers": len(table.layers),
            "options": [f"w{w}a{a}" for w, a in table.options], "seconds": table.meta.get("seconds"),
            "min_compression": table.extreme("compression"), "table": table.to_dict()}


def plot_curves(rows: list[dict[str, Any]], path: str | Path, metric: str = "quant_top1") -> None:
    """Top-1 (or another row metric, e.g. 'kl' to the float logits on the test split) against
    compression, one line per (suite, method); for top-1 the float top-1 dashed."""
    plt = pyplot()

    points = [r for r in rows if r.get(metric) is not None]
    suites = list(dict.fromkeys(r["suite"] for r in points))
    fig, axes = plt.subplots(1, max(1, len(suites)), figsize=(6 * max(1, len(suites)), 4.5),
                             squeeze=False)
    for ax, suite in zip(axes[0], suites):
        mine = [r for r in points if r["suite"] == suite]
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = sorted((r["compression"], r[metric]) for r in mine if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        if metric == "quant_top1":
            ax.axhline(mine[0]["fp32_top1"], color="k", ls="--", lw=1, label="float")
        else:
            ax.set_yscale("log")
        ax.set(title=suite, xlabel="compression (weight bits / 32)",
               ylabel="top-1 (%)" if metric == "quant_top1" else metric)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--compressions {text!r}: expected numbers like 0.25,0.13") from None


def add_sweep_parser(sub: Any) -> None:
    """The ``ptqkit sweep`` subcommand (registered by cli.build_parser)."""
    s = sub.add_parser("sweep", help="compression-accuracy curves: greedy, IP, light, advanced")
    s.add_argument("--suite", required=True,
                   help=f"one or several (comma-separated) of {', '.join(sorted(bench.SUITES))}")
    s.add_argument("--compressions", default="0.25,0.2,0.16,0.14,0.13,0.12",
                   help="weight compression ratios in (0, 1] (all-8-bit = 0.25)")
    s.add_argument("--methods", default=",".join(SWEEP_METHODS),
                   help=f"comma-separated, any of {', '.join(SWEEP_METHODS)}")
    s.add_argument("--candidates", default=SweepConfig.candidates,
                   help="per-layer options: default, relaxed, or e.g. w8a8,w4a4,w2a2")
    s.add_argument("--no-first-last-8bit", action="store_true")
    s.add_argument("--calib-size", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data-dir")
    s.add_argument("--adaquant-iters", type=int, help="AdaQuant steps per (layer, candidate) "
                   "for the advanced method (default: AdaQuantOptions.iters)")
    s.add_argument("--tables", help="folder for the sensitivity tables (JSON) and tuned layer "
                   "states; a table measured for the same settings is reloaded, not re-measured")
    s.add_argument("--alternatives", type=int, default=SweepConfig.alternatives,
                   help="IP methods: measure the k best IP solutions on the calibration set and "
                   "keep the best measured (1 = the IP optimum only)")
    s.add_argument("--refine-rounds", type=int, default=RefineOptions.rounds,
                   help="IP methods: context refinement rounds (re-measure each layer's options "
                   "inside the chosen configuration, re-solve, keep if the calibration loss "
                   "drops); 0 = the paper's IP")
    s.add_argument("--refine-samples", type=int, default=RefineOptions.samples,
                   help="calibration samples for the refinement's re-measurement (0 = all)")
    s.add_argument("--refine-neighbours", choices=("adjacent", "all"),
                   default=RefineOptions.neighbours,
                   help="options re-measured per layer: bits adjacent to the current ones, or all")
    s.add_argument("--plot", help="write the curve here (PNG)")
    s.add_argument("--json", help="write the rows as JSON here; rows already in it are kept and "
                   "their points skipped (resume)")
    s.add_argument("--post-guard", action="store_true",
                   help="undo a global step (BN / bias tuning) that raises the calibration loss")
    s.add_argument("--report-only", action="store_true",
                   help="measure nothing: print the table and plot from the rows in --json")
    s.set_defaults(func=cmd_sweep)


def _resume(path: str | None) -> list[dict[str, Any]]:
    """Rows of an earlier run written to the same --json (its points are skipped), else []."""
    if not path or not Path(path).is_file():
        return []
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{path} does not hold sweep rows (a JSON list); pass another --json")
    log.info("resuming: %d rows already in %s", len(rows), path)
    return rows


def cmd_sweep(args: Any) -> int:
    cfg = SweepConfig(compressions=_floats(args.compressions),
                      methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                      candidates=args.candidates, first_last_8bit=not args.no_first_last_8bit,
                      calib_size=args.calib_size, seed=args.seed, data_dir=args.data_dir,
                      table_dir=args.tables, alternatives=args.alternatives,
                      post_guard=args.post_guard,
                      refine=RefineOptions(args.refine_rounds, args.refine_samples or None,
                                           args.refine_neighbours),
                      tuner_options={"adaquant": {"iters": args.adaquant_iters}}
                      if args.adaquant_iters else {})
    rows = _resume(args.json)

    def save(row: dict[str, Any]) -> None:
        rows.append(row)
        if args.json:  # after every point (atomic), so a long sweep keeps what it measured
            bench.write_json(rows, args.json)

    if args.report_only and not rows:
        raise ValueError("--report-only needs --json FILE holding the rows of a sweep")
    for suite in (s.strip() for s in args.suite.split(",") if s.strip() and not args.report_only):
        done = {(r["method"], r.get("budget")) for r in rows if r.get("suite") == suite}
        run_sweep(suite, cfg, on_row=save, done=done)
    args.sweep_rows = rows  # every row of this sweep, for the caller (the --report writer)
    points = [r for r in rows if not str(r["method"]).startswith("table:")]
    print(bench.markdown_table(points, ("suite", "method", "budget", "compression", "fp32_top1",
                                        "quant_top1", "delta", "expected_calib_loss",
                                        "measured_calib_loss", "error")))
    if args.json and not args.report_only:
        print(f"wrote {args.json}")
    if args.plot:
        plot_curves(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0
