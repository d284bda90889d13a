"""What every method shares: the Step interface, its registry, the run context and the report."""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..calib.data import CalibrationData
from ..calib.loss import calibration_loss
from ..nn.control import float_weights, original_float
from ..nn.modules import QuantModule, quant_layers

__all__ = ["Step", "STEPS", "register_step", "Context", "Report", "NoOptions", "all_zero",
           "calibration_kl"]


@dataclass(frozen=True)
class NoOptions:
    """Options of a step that takes none."""


class Step:
    """One stage of a pipeline. Subclasses set ``name`` and ``Options`` (a frozen dataclass
    validated in __post_init__) and implement ``run``, which mutates ``ctx.qmodel`` and returns a
    JSON-able summary for the report."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    def run(self, ctx: Context) -> dict[str, Any]:
        raise NotImplementedError


STEPS: dict[str, type[Step]] = {}


def register_step(cls: type[Step]) -> type[Step]:
    STEPS[cls.name] = cls
    return cls


def options_from_dict(step: type[Step], values: dict[str, Any]) -> Any:
    """Build a step's Options from a dict, rejecting unknown keys with the valid ones named."""
    known = {f.name for f in dataclasses.fields(step.Options)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for step {step.name!r}; "
                         f"valid options: {sorted(known) or 'none'}")
    return step.Options(**values)


@dataclass
class Report:
    """Human- and machine-readable account of a quantization run."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    stays_float: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    # share of MACs run quantized: {"fraction", "quantized_macs", "total_macs", "float_layers"}
    coverage: dict[str, Any] = field(default_factory=dict)

    def layer(self, name: str) -> dict[str, Any]:
        return self.layers.setdefault(name, {})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        cols = ["layer", "type", "w_bits", "a_bits", "w_range", "a_range", "sqnr_db"]
        rows = [[name] + [_fmt(info.get(c)) for c in cols[1:]] for name, info in self.layers.items()]
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c)
                  for i, c in enumerate(cols)]
        line = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths))  # noqa: E731
        out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in rows]
        out += [f"step {s['step']}: {s.get('seconds', 0):.1f}s" for s in self.steps]
        if self.coverage:
            out.append(f"coverage: {self.coverage['summary']}")
        if self.stays_float:
            out.append("stays float: " + ", ".join(self.stays_float))
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


@dataclass
class Context:
    """Everything a step may use. ``qmodel`` is the copy being quantized; the user's model is
    never touched. Float outputs of the (BN-folded) network are computed with quantizers off."""

    qmodel: nn.Module
    calib: CalibrationData
    report: Report
    seed: int = 0
    cache: dict[str, Any] = field(default_factory=dict)

    def layers(self) -> dict[str, QuantModule]:
        return quant_layers(self.qmodel)

    def snapshot_float(self) -> None:
        """Remember the float weights before any step adapts them (``as_float`` uses them)."""
        self.cache.setdefault("float_weights", float_weights(self.qmodel))

    def as_float(self) -> AbstractContextManager[nn.Module]:
        """The float model: quantizers off and, after ``snapshot_float``, the float weights of
        that moment swapped in (restored on exit)."""
        return original_float(self.qmodel, self.cache.get("float_weights"))

    @torch.no_grad()
    def float_outputs(self) -> list[torch.Tensor]:
        """Float-model outputs for every calibration batch (computed once, then cached)."""
        if "float_outputs" not in self.cache:
            with self.as_float():
                self.cache["float_outputs"] = [self.calib.forward(self.qmodel, b)
                                               for b in self.calib]
        return self.cache["float_outputs"]


def all_zero(outputs: list[torch.Tensor]) -> bool:
    """True when every output tensor is all zeros (no logits to compare a quantized model on)."""
    return all(not bool(o.any()) for o in outputs)


@torch.no_grad()
def calibration_kl(ctx: Context) -> float:
    """:func:`~ptqkit.calib.loss.calibration_loss` (the KL) of ``ctx.qmodel`` against the float
    outputs on the calibration set."""
    return calibration_loss(ctx.float_outputs(),
                            (ctx.calib.forward(ctx.qmodel, b) for b in ctx.calib.batches))
