"""Benchmark suites -> JSON rows + a markdown table (the protocol of docs/benchmarks.md).

A method is either a Recipe factory (``METHODS``) or a runner that builds its own row
(``RUNNERS``, e.g. a peer toolkit). Every row carries the float baseline measured in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from .algorithms.base import Report
from .calib.data import CalibrationData
from .evaluate import compression_ratio, evaluate, predict, top1
from .peers import PEER_RUNNERS
from .pipeline import Recipe, quantize
from .plotting import pyplot

__all__ = ["BenchConfig", "Suite", "SUITES", "METHODS", "RUNNERS", "run_bench", "markdown_table",
           "write_json", "calib_size_study", "study_summary", "plot_study", "merge_study"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """Settings of one benchmark row (everything that decides the result)."""

    w_bits: int = 4
    a_bits: int = 4
    first_last_8bit: bool = True
    calib_size: int = 1000
    seed: int = 0
    data_dir: str | None = None
    latency_threads: int = 2  # ONNX Runtime intra-op threads of the deploy row's latencies
    allow_low_coverage: bool = False  # print rows of models under MIN_COVERAGE of MACs quantized
    holdout: int = 0  # > 0: evaluate on this many calibration images kept out of calibration

    def __post_init__(self) -> None:
        Recipe(w_bits=self.w_bits, a_bits=self.a_bits)  # validates bits
        if self.calib_size < 1:
            raise ValueError(f"calib_size must be >= 1, got {self.calib_size}")
        if self.latency_threads < 1:
            raise ValueError(f"latency_threads must be >= 1, got {self.latency_threads}")
        if self.holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {self.holdout}")

    def recipe(self, **kw: Any) -> Recipe:
        return Recipe.from_dict({"w_bits": self.w_bits, "a_bits": self.a_bits,
                                 "first_last_8bit": self.first_last_8bit, "seed": self.seed, **kw})


@dataclass
class Suite:
    """A float model with its calibration source and labelled test split."""

    name: str
    float_model: nn.Module
    x_test: Any
    y_test: torch.Tensor | None  # None: a label-free suite, judged by closeness to float
    make_calib: Callable[[int, int], CalibrationData]
    forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def calib(self, n: int, seed: int) -> CalibrationData:
        key = f"calib-{n}-{seed}"
        if key not in self.cache:
            self.cache[key] = self.make_calib(n, seed)
        return self.cache[key]

    def float_logits(self) -> torch.Tensor:
        if "float_logits" not in self.cache:
            self.cache["float_logits"] = predict(self.float_model, self.x_test, desc="float")
        return self.cache["float_logits"]

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """top1, fp32_top1, agreement, kl of ``model`` on the test split."""
        return evaluate(model, self.float_model, self.x_test, self.y_test, self.float_logits())

    @property
    def fp32_top1(self) -> float | None:
        return None if self.y_test is None else top1(self.float_logits(), self.y_test)


def _fmnist_suite(name: str) -> Callable[[BenchConfig], Suite]:
    def make(cfg: BenchConfig) -> Suite:
        from .zoo import fmnist_calibration, fmnist_test, load_model

        x, y = fmnist_test(cfg.data_dir)
        return Suite(name, load_model(name), x, y,
                     lambda n, seed: fmnist_calibration(n, seed, cfg.data_dir))
    return make


def _text_suite(cfg: BenchConfig) -> Suite:
    """text-minilm (zoo/text.py): MiniLM + tweets, probe accuracy and cosine to float; protocol
    calibration is 512 train tweets (--calib-size 512). Duck-types Suite."""
    from .zoo.text import TextSuiteConfig, text_minilm_suite

    return text_minilm_suite(TextSuiteConfig(seed=cfg.seed))  # type: ignore[return-value]


IMAGENET_CALIB, IMAGENET_EVAL = 1024, 3000  # composites built (and cached) per split
HOLDOUT_SEED = 1234  # which calibration images --holdout keeps out


def _imagenet_suite(cfg: BenchConfig) -> Suite:
    """imagenet-efficientnet-lite0 (zoo/imagenet.py): no labels; metrics are agreement, top-5
    agreement, KL to float on 3000 evaluation composites; calibration draws from 1024 others."""
    from .zoo.imagenet import efficientnet_lite0, imagenet_images, normalize

    pool = full = imagenet_images(IMAGENET_CALIB, "calib", 0)
    held = torch.empty(0, dtype=torch.long)
    if cfg.holdout:  # choose defaults on calibration images, never on the evaluation split
        if cfg.holdout >= len(pool):
            raise ValueError(f"--holdout must leave calibration images: the suite has {len(pool)}, "
                             f"got {cfg.holdout}")
        perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
        held, pool = perm[:cfg.holdout], pool[perm[cfg.holdout:]]

    def make_calib(n: int, seed: int) -> CalibrationData:
        if n > len(pool):
            raise ValueError(f"imagenet-efficientnet-lite0 has {len(pool)} calibration images"
                             f"{' besides the held-out ones' if cfg.holdout else ''}; use "
                             f"--calib-size <= {len(pool)}, got {n}")
        idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]
        return CalibrationData(normalize(pool[idx]).split(16))

    x = normalize(full[held] if cfg.holdout else imagenet_images(IMAGENET_EVAL, "eval", 1))
    return Suite("imagenet-efficientnet-lite0", efficientnet_lite0(), x, None, make_calib)


SUITES: dict[str, Callable[[BenchConfig], Suite]] = {
    "imagenet-efficientnet-lite0": _imagenet_suite,
    "fmnist-resnet20": _fmnist_suite("fmnist-resnet20"),
    "fmnist-mobilenetv2": _fmnist_suite("fmnist-mobilenetv2"),
    "text-minilm": _text_suite,
}

RECIPES_DIR = Path(__file__).parent / "recipes"


def _file_method(path: Path) -> Callable[[BenchConfig], Recipe]:
    """A bench method from a named recipe file: the file's keys over the row's bits, first/last
    policy and seed (a file that sets its own bits, as the light/advanced pipelines do, keeps
    them)."""
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a recipe mapping, got {type(spec).__name__}")

    def make(c: BenchConfig) -> Recipe:
        return Recipe.from_dict({"w_bits": c.w_bits, "a_bits": c.a_bits,
                                 "first_last_8bit": c.first_last_8bit, "seed": c.seed, **spec})
    return make


# One YAML file per method in ptqkit/recipes/, readable and copyable by users.
METHODS: dict[str, Callable[[BenchConfig], Recipe]] = {
    p.stem: _file_method(p) for p in sorted(RECIPES_DIR.glob("*.yaml"))}

RUNNERS: dict[str, Callable[[Suite, BenchConfig], dict[str, Any]]] = {}


def _method(name: str) -> Callable[[BenchConfig], Recipe]:
    """A named method, or a recipe file of the user's own (a path ending in .yaml or .yml)."""
    if name in METHODS:
        return METHODS[name]
    if name.endswith((".yaml", ".yml")):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"recipe file {name} not found; give the path of a YAML recipe")
        Recipe.from_yaml(path)  # one-line errors for a bad file
        return _file_method(path)
    raise ValueError(f"unknown method {name!r}; expected a recipe file (.yaml) or one of "
                     f"{', '.join(sorted([*METHODS, *RUNNERS]))}")


def _ort_peer(method: str) -> Callable[[Suite, BenchConfig], dict[str, Any]]:
    def run(suite: Suite, cfg: BenchConfig) -> dict[str, Any]:
        from .export.deploy_bench import ort_peer_row  # lazy: onnx is an optional dependency
        return ort_peer_row(suite, cfg, method)
    return run


DEPLOY_PREFIX = "deploy:"  # "deploy:<method>": the deploy row of a named method or recipe file


def _deploy(suite: Suite, cfg: BenchConfig, base: Recipe | None = None) -> dict[str, Any]:
    """The deploy row (export/deploy_bench.py) of ``base``, default the default recipe."""
    from .export.deploy_bench import LatencySpec, deploy_recipe, deploy_row
    return deploy_row(suite, cfg, deploy_recipe(suite, cfg, base=base),
                      LatencySpec(threads=cfg.latency_threads))


RUNNERS.update({m: _ort_peer(m) for m in ("ort-minmax", "ort-entropy", "ort-percentile")})
RUNNERS["deploy"] = _deploy
RUNNERS.update(PEER_RUNNERS)  # nncf, brevitas (imported lazily)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


MIN_COVERAGE = 0.9  # share of MACs quantized under which a ptqkit row is refused


def run_method(suite: Suite, method: str, cfg: BenchConfig) -> dict[str, Any]:
    """Quantize with one method and evaluate: one JSON-able row."""
    row: dict[str, Any] = {"suite": suite.name, "method": method, "w_bits": cfg.w_bits,
                           "a_bits": cfg.a_bits, "first_last_8bit": cfg.first_last_8bit,
                           "calib_size": cfg.calib_size, "seed": cfg.seed,
                           **({"holdout": cfg.holdout} if cfg.holdout else {})}
    if method in RUNNERS:
        return {**row, **RUNNERS[method](suite, cfg)}
    if method.startswith(DEPLOY_PREFIX):
        dep = _deploy(suite, cfg, _method(method.removeprefix(DEPLOY_PREFIX))(cfg))
        return {**row, **dep, "method": method + dep["method"].removeprefix("deploy")}
    recipe = _method(method)(cfg)
    calib = suite.calib(cfg.calib_size, cfg.seed)
    t0, cpu0 = time.perf_counter(), time.process_time()
    qmodel = quantize(suite.float_model, calib, recipe, forward_fn=suite.forward_fn)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    cov: dict[str, Any] = cast(Report, qmodel.report).coverage
    if cov["fraction"] < MIN_COVERAGE and not cfg.allow_low_coverage:
        return {**row, "mac_coverage": cov["fraction"], "quant_top1": None, "agreement": None,
                "error": f"refused: {cov['summary']} (under {100 * MIN_COVERAGE:.0f}%; "
                         "pass --allow-low-coverage to print it)"}
    res = suite.evaluate(qmodel)
    return {**row, "fp32_top1": res.get("fp32_top1"), "quant_top1": res.get("top1"),
            "delta": _delta(res), "agreement": res["agreement"], "kl": res["kl"],
            "compression": compression_ratio(qmodel), "mac_coverage": cov["fraction"],
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "peak_rss_mb": peak_rss_mb(), "recipe": recipe.to_dict(),
            "choices": _step_choices(qmodel), **_extra_metrics(res)}


def _step_choices(qmodel: Any) -> dict[str, dict[str, Any]]:
    """What the steps chose from the data (AdaQuant's start ranges, LAPQ's initial point)."""
    report = getattr(qmodel, "report", None)
    steps = report.steps if report is not None else []
    return {s["step"]: {k: s[k] for k in ("start", "init") if k in s}
            for s in steps if "start" in s or "init" in s}


def _extra_metrics(res: dict[str, Any]) -> dict[str, Any]:
    """Suite-specific metrics beyond top1/agreement/kl (e.g. text-minilm's cosine)."""
    return {k: v for k, v in res.items() if k not in ("top1", "fp32_top1", "agreement", "kl")}


def _delta(res: dict[str, Any]) -> float | None:
    if res.get("top1") is None or res.get("fp32_top1") is None:
        return None
    return res["top1"] - res["fp32_top1"]


def run_bench(suite_name: str, methods: list[str], cfg: BenchConfig) -> list[dict[str, Any]]:
    """Run every method on one suite; the float baseline is measured once, in the same run."""
    if suite_name not in SUITES:
        raise ValueError(f"unknown suite {suite_name!r}; expected one of {', '.join(sorted(SUITES))}")
    for m in methods:
        if m not in RUNNERS:
            _method(m.removeprefix(DEPLOY_PREFIX))  # unknown names, unreadable files: before any work
    if cfg.holdout and suite_name != "imagenet-efficientnet-lite0":
        raise ValueError("--holdout is available for imagenet-efficientnet-lite0 only; the zoo "
                         "suites calibrate on train images and evaluate on their test split")
    suite = SUITES[suite_name](cfg)
    rows = []
    for method in tqdm(methods, desc=f"bench {suite_name}", disable=None):
        rows.append(run_method(suite, method, cfg))
        log.info("%s %s: %s", suite_name, method, rows[-1].get("quant_top1"))
    return rows


_COLUMNS = ("suite", "method", "w_bits", "a_bits", "fp32_top1", "quant_top1", "delta", "agreement",
            "compression", "seconds")
_OPTIONAL_COLUMNS = ("agreement_se", "top5_agreement", "kl", "mac_coverage", "cosine",
                     "error")  # shown when a row reports it


def markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...] = _COLUMNS) -> str:
    columns += tuple(c for c in _OPTIONAL_COLUMNS if c not in columns and any(c in r for r in rows))
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 1 else f"{v:.2f}"
        return "-" if v is None else str(v)
    head = "| " + " | ".join(columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |"
                                     for r in rows])


def write_json(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write rows atomically (a temporary file renamed into place: never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def calib_size_study(suite_name: str, methods: list[str], sizes: list[int], seeds: int,
                     cfg: BenchConfig) -> list[dict[str, Any]]:
    """One row per (calibration size, seed, method): the over-fitting study of Hubara et al.
    (Fig. 1). Seeds 0..seeds-1 pick different calibration images (and seed the methods)."""
    if suite_name not in SUITES:
        raise ValueError(f"unknown suite {suite_name!r}; expected one of {', '.join(sorted(SUITES))}")
    if not sizes or min(sizes) < 1 or seeds < 1:
        raise ValueError(f"calibration sizes must be >= 1 and seeds >= 1, got {sizes}, {seeds}")
    suite = SUITES[suite_name](cfg)
    rows = []
    for size in sizes:
        for seed in range(seeds):
            c = dataclasses.replace(cfg, calib_size=size, seed=seed)
            rows += [run_method(suite, m, c) for m in methods]
            log.info("calibration size %d seed %d done", size, seed)
    return rows


def study_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation of top-1 per (method, calibration size)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["calib_size"]), []).append(r)
    out = []
    for (method, size), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        top = torch.tensor([float(r["quant_top1"]) for r in rs], dtype=torch.float64)
        out.append({"suite": rs[0]["suite"], "method": method, "calib_size": size, "seeds": len(rs),
                    "fp32_top1": rs[0]["fp32_top1"], "top1_mean": float(top.mean()),
                    "top1_std": float(top.std()) if len(rs) > 1 else 0.0,
                    "top1_per_seed": {int(r["seed"]): float(r["quant_top1"]) for r in rs},
                    "w_bits": rs[0]["w_bits"], "a_bits": rs[0]["a_bits"]})
    return out


def merge_study(paths: list[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Rows of several study JSON files (e.g. one queue job per calibration size), their
    summaries dropped, duplicates (same suite, method, size, seed) rejected: summarise the
    result with ``study_summary``."""
    rows: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for path in paths:
        for r in json.loads(Path(path).read_text()):
            if "summary" in r:
                continue
            key = (r["suite"], r["method"], r["calib_size"], r["seed"], r["w_bits"], r["a_bits"])
            if key in seen:
                raise ValueError(f"{path}: row {key} already came from another file; merge each "
                                 "(suite, method, size, seed) once")
            seen.add(key)
            rows.append(r)
    return rows


def plot_study(summary: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Top-1 (mean +- std over seeds) against calibration size, one line per method, float dashed."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in summary):
        rs = [r for r in summary if r["method"] == method]
        ax.errorbar([r["calib_size"] for r in rs], [r["top1_mean"] for r in rs],
                    yerr=[r["top1_std"] for r in rs], marker="o", capsize=3, label=method)
    if summary and summary[0].get("fp32_top1") is not None:
        ax.axhline(summary[0]["fp32_top1"], color="k", ls="--", lw=1, label="float")
    ax.set_xscale("log")
    ax.set_xlabel("calibration images")
    ax.set_ylabel("top-1 (%)")
    s = summary[0] if summary else {}
    ax.set_title(f"{s.get('suite', '')} W{s.get('w_bits', '?')}A{s.get('a_bits', '?')}")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
