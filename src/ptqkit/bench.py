"""Benchmark suites -> JSON rows + a markdown table (the protocol of BENCHMARKS.md).

A method is either a Recipe factory (``METHODS``) or a runner that builds its own row
(``RUNNERS``, e.g. a peer toolkit). Every row carries the float baseline measured in the same run.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calib.data import CalibrationData
from .evaluate import compression_ratio, evaluate, predict, top1
from .pipeline import Recipe, quantize

__all__ = ["BenchConfig", "Suite", "SUITES", "METHODS", "RUNNERS", "run_bench", "markdown_table",
           "write_json"]

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

    def __post_init__(self) -> None:
        Recipe(w_bits=self.w_bits, a_bits=self.a_bits)  # validates bits
        if self.calib_size < 1:
            raise ValueError(f"calib_size must be >= 1, got {self.calib_size}")

    def recipe(self, **kw: Any) -> Recipe:
        return Recipe.from_dict({"w_bits": self.w_bits, "a_bits": self.a_bits,
                                 "first_last_8bit": self.first_last_8bit, "seed": self.seed, **kw})


@dataclass
class Suite:
    """A float model with its calibration source and labelled test split."""

    name: str
    float_model: nn.Module
    x_test: Any
    y_test: torch.Tensor
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
    def fp32_top1(self) -> float:
        return top1(self.float_logits(), self.y_test)


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


SUITES: dict[str, Callable[[BenchConfig], Suite]] = {
    "fmnist-resnet20": _fmnist_suite("fmnist-resnet20"),
    "fmnist-mobilenetv2": _fmnist_suite("fmnist-mobilenetv2"),
    "text-minilm": _text_suite,
}

METHODS: dict[str, Callable[[BenchConfig], Recipe]] = {
    "minmax": lambda c: c.recipe(w_range="minmax", a_range="minmax"),
    "percentile": lambda c: c.recipe(w_range="percentile", a_range="percentile"),
    "mse": lambda c: c.recipe(w_range="mse", a_range="mse"),
}

RUNNERS: dict[str, Callable[[Suite, BenchConfig], dict[str, Any]]] = {}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_method(suite: Suite, method: str, cfg: BenchConfig) -> dict[str, Any]:
    """Quantize with one method and evaluate: one JSON-able row."""
    row: dict[str, Any] = {"suite": suite.name, "method": method, "w_bits": cfg.w_bits,
                           "a_bits": cfg.a_bits, "first_last_8bit": cfg.first_last_8bit,
                           "calib_size": cfg.calib_size, "seed": cfg.seed}
    if method in RUNNERS:
        return {**row, **RUNNERS[method](suite, cfg)}
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of "
                         f"{', '.join(sorted([*METHODS, *RUNNERS]))}")
    recipe = METHODS[method](cfg)
    calib = suite.calib(cfg.calib_size, cfg.seed)
    t0 = time.perf_counter()
    qmodel = quantize(suite.float_model, calib, recipe, forward_fn=suite.forward_fn)
    seconds = time.perf_counter() - t0
    res = suite.evaluate(qmodel)
    return {**row, "fp32_top1": res.get("fp32_top1"), "quant_top1": res.get("top1"),
            "delta": _delta(res), "agreement": res["agreement"], "kl": res["kl"],
            "compression": compression_ratio(qmodel), "seconds": seconds,
            "peak_rss_mb": peak_rss_mb(), "recipe": recipe.to_dict(), **_extra_metrics(res)}


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
    unknown = [m for m in methods if m not in METHODS and m not in RUNNERS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected any of "
                         f"{', '.join(sorted([*METHODS, *RUNNERS]))}")
    suite = SUITES[suite_name](cfg)
    rows = []
    for method in tqdm(methods, desc=f"bench {suite_name}", disable=None):
        rows.append(run_method(suite, method, cfg))
        log.info("%s %s: %s", suite_name, method, rows[-1].get("quant_top1"))
    return rows


_COLUMNS = ("suite", "method", "w_bits", "a_bits", "fp32_top1", "quant_top1", "delta", "agreement",
            "compression", "seconds")
_OPTIONAL_COLUMNS = ("cosine",)  # shown when a suite reports it


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
