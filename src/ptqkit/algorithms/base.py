"""What every method shares: the Step interface, its registry, the run context and the report."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from ..calib.data import CalibrationData, batch_size_of
from ..calib.loss import calibration_loss
from ..nn.control import FloatWeights, float_weights, original_float
from ..nn.modules import QuantModule, quant_layers

if TYPE_CHECKING:
    from ..pipeline import Recipe
    from .bn_tuning import BNTuningHandle

__all__ = ["Step", "STEPS", "register_step", "Context", "Cache", "Report", "NoOptions", "all_zero",
           "calibration_kl", "EFFECTS", "build_options", "options_from_dict", "check_type",
           "check_fields", "check_string_keys", "show_value"]


# ----------------------------------------------------------------------------- type checks
# Recipe values come from YAML: a bool must be a YAML bool, a number a number (never a bool), a
# list a list, a string a string. The expected type of a field is its dataclass annotation.
_SCALARS: dict[Any, tuple[str, str]] = {
    bool: ("a bool (true or false)", "bools"), int: ("an int", "ints"),
    float: ("a number", "numbers"), str: ("a string", "strings"), type(None): ("null", "nulls")}


def _parts(hint: Any) -> tuple[Any, tuple[Any, ...]]:
    return typing.get_origin(hint), typing.get_args(hint)


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or origin is types.UnionType


def _matches(value: Any, hint: Any) -> bool:
    """True when ``value`` (as YAML gives it) has the annotated type ``hint``."""
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(value))
    if hint is str or hint is type(None):
        return isinstance(value, hint)
    origin, args = _parts(hint)
    if _is_union(origin):
        return any(_matches(value, a) for a in args)
    if origin is tuple:
        if args == (str, ...) and isinstance(value, str):
            return True  # a single pattern
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if origin in (Mapping, dict):
        key, val = args or (Any, Any)
        return isinstance(value, Mapping) and all(
            _matches(k, key) and _matches(v, val) for k, v in value.items())
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any, plural: bool = False) -> str:
    """'an int', 'a list of 2 numbers', 'a string or null', ... (plural: 'ints', ...)."""
    if hint in _SCALARS:
        return _SCALARS[hint][plural]
    origin, args = _parts(hint)
    if _is_union(origin):
        return " or ".join(_describe(a, plural) for a in args)
    if origin is tuple:
        lists = "lists" if plural else "a list"
        if len(args) == 2 and args[1] is Ellipsis:
            text = f"{lists} of {_describe(args[0], True)}"
            return f"{_describe(str, plural)} or {text}" if args[0] is str else text
        if len(set(args)) == 1:
            return f"{lists} of {len(args)} {_describe(args[0], True)}"
        return f"{lists} of ({', '.join(_describe(a) for a in args)})"
    if origin in (Mapping, dict):
        key, val = args or (Any, Any)
        text = "mappings" if plural else "a mapping"
        if key is Any:
            return text
        if val is Any:
            return f"{text} with {_describe(key)} keys"
        return f"{text} of {_describe(key, True)} to {_describe(val, True)}"
    return getattr(hint, "__name__", str(hint))


def _nonfinite(value: Any) -> bool:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_nonfinite(v) for v in value)
    if isinstance(value, Mapping):
        return any(_nonfinite(v) for v in value.values())
    return False


def show_value(value: Any) -> str:
    """The given value for a one-line message: its repr (shortened) and its type."""
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def check_type(where: str, value: Any, hint: Any) -> None:
    """Raise a one-line ValueError naming ``where`` unless ``value`` has the type ``hint``."""
    if not _matches(value, hint):
        note = " (numbers must be finite)" if _nonfinite(value) else ""
        raise ValueError(f"{where}: expected {_describe(hint)}{note}, got {show_value(value)}")


def check_string_keys(where: str, d: Mapping[Any, Any]) -> None:
    for key in d:
        if not isinstance(key, str):
            raise ValueError(f"{where} {show_value(key)} is not a string; write the name as text")


def check_fields(cls: type, where: Callable[[str], str], values: Mapping[str, Any],
                  skip: tuple[str, ...] = ()) -> None:
    """Check each value in ``values`` against the annotation of the field of ``cls`` it names
    (unknown names are left to the caller)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values and f.name not in skip:
            check_type(where(f.name), values[f.name], hints[f.name])


T = TypeVar("T")


def build_options(cls: type[T], values: Any, where: str) -> T:
    """``cls(**values)`` for an Options dataclass ``cls`` after checking that ``values`` is a
    mapping of its field names to values of their annotated types; one-line ValueErrors start
    with ``where`` and name the key, the expected type and how to fix it."""
    check_type(f"{where} options", values, Mapping[Any, Any])
    check_string_keys(f"{where} option name", values)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; valid options: "
                         f"{sorted(known) or 'none'}")
    check_fields(cls, lambda key: f"{where} option {key!r}", values)
    return cls(**values)


@dataclass(frozen=True)
class NoOptions:
    """Options of a step that takes none."""


OptionsT = TypeVar("OptionsT")

# What a step may do to the model being quantized (``Step.effects``):
EFFECTS = frozenset({
    "initialises_ranges",    # sets every quantizer's range from calibration statistics
    "quantizes_embeddings",  # quantizes embedding tables (nothing else)
    "tunes_ranges",          # moves quantizer ranges (step sizes, zero-points) after initialisation
    "changes_weights",       # adapts float weights, biases or folded BN statistics
    "changes_bits",          # changes layers' bit widths
    "adds_quantizers",       # quantizes tensors that were float (e.g. layer outputs)
    "rescales_channels",     # rescales float layer outputs channel by channel (equalization);
                             # the float reference of every layer output is taken again after it
})


class Step(Generic[OptionsT]):
    """One stage of a pipeline. Subclasses set ``name``, ``Options`` (a frozen dataclass
    validated in __post_init__) and ``effects`` (a subset of :data:`EFFECTS`; by default every
    effect but the range initialisation, the safe guess for a step that says nothing) and
    implement ``run``, which mutates ``ctx.qmodel`` and returns a JSON-able summary for the
    report."""

    name: ClassVar[str]
    Options: ClassVar[type[Any]] = NoOptions
    effects: ClassVar[frozenset[str]] = EFFECTS - {"initialises_ranges", "quantizes_embeddings"}

    def __init__(self, options: OptionsT) -> None:
        self.options: OptionsT = options

    def run(self, ctx: Context) -> dict[str, Any]:
        raise NotImplementedError


STEPS: dict[str, type[Step[Any]]] = {}
S = TypeVar("S", bound="type[Step[Any]]")


def register_step(cls: S) -> S:
    """Add a step class to :data:`STEPS` under its ``name`` (its ``effects`` must be known)."""
    unknown = sorted(cls.effects - EFFECTS)
    if unknown:
        raise ValueError(f"step {cls.name!r} declares unknown effect(s) {unknown}; expected a "
                         f"subset of {sorted(EFFECTS)}")
    STEPS[cls.name] = cls
    return cls


def options_from_dict(step: type[Step[Any]], values: dict[str, Any]) -> Any:
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
class Cache:
    """What steps share during one run. ``float_outputs``: the float model's logits of every
    calibration batch (None: computed on first use); ``float_weights``: the float weights before
    any step adapted them (None: the current ones); ``bn_tuning_undo``: how to undo the BN
    tuning step (set by that step)."""

    float_outputs: list[torch.Tensor] | None = None
    float_weights: FloatWeights | None = None
    bn_tuning_undo: BNTuningHandle | None = None


@dataclass
class Context:
    """Everything a step may use. ``qmodel`` is the copy being quantized; the user's model is
    never touched. Float outputs of the (BN-folded) network are computed with quantizers off.
    ``recipe``: the run's recipe (None when a step runs outside ``quantize``: steps then use
    their own defaults). ``cache`` also takes a mapping of Cache's field names."""

    qmodel: nn.Module
    calib: CalibrationData
    report: Report
    seed: int = 0
    cache: Cache = field(default_factory=Cache)
    recipe: Recipe | None = None

    def __post_init__(self) -> None:
        if isinstance(self.cache, Mapping):
            known = {f.name for f in dataclasses.fields(Cache)}
            unknown = sorted(set(self.cache) - known)
            if unknown:
                raise ValueError(f"unknown cache key(s) {unknown}; expected some of {sorted(known)}")
            self.cache = Cache(**self.cache)

    def layers(self) -> dict[str, QuantModule]:
        return quant_layers(self.qmodel)

    def snapshot_float(self) -> None:
        """Remember the float weights before any step adapts them (``as_float`` uses them)."""
        if self.cache.float_weights is None:
            self.cache.float_weights = float_weights(self.qmodel)

    def as_float(self) -> AbstractContextManager[nn.Module]:
        """The float model: quantizers off and, after ``snapshot_float``, the float weights of
        that moment swapped in (restored on exit)."""
        return original_float(self.qmodel, self.cache.float_weights)

    def wants_float_outputs(self) -> bool:
        """Whether a pass of ``qmodel`` with its quantizers off should keep its outputs as the
        float reference: none are cached yet and every layer's (weight, bias) still equals the
        float snapshot (a bias added after it must be zero). A float pass that a step makes
        anyway then stores them with ``keep_float_outputs`` instead of ``float_outputs``
        running one more."""
        if self.cache.float_outputs is not None:
            return False
        saved = self.cache.float_weights or {}
        for name, layer in self.layers().items():
            if name not in saved:
                continue
            w, b = saved[name]
            bias = layer.bias
            if not torch.equal(layer.weight, w):
                return False
            if bias is not None and not torch.equal(bias, b if b is not None
                                                    else torch.zeros_like(bias)):
                return False
        return True

    def keep_float_outputs(self, outputs: list[torch.Tensor]) -> None:
        """Cache ``outputs`` (one per calibration batch, from a pass that ``wants_float_outputs``
        approved) as the float reference."""
        if len(outputs) != len(self.calib.batches):
            raise ValueError(f"expected one float output per calibration batch "
                             f"({len(self.calib.batches)}), got {len(outputs)}")
        self.cache.float_outputs = outputs

    @torch.no_grad()
    def float_outputs(self) -> list[torch.Tensor]:
        """Float-model outputs for every calibration batch (computed once, then cached)."""
        if self.cache.float_outputs is None:
            with self.as_float():
                self.cache.float_outputs = [self.calib.forward(self.qmodel, b)
                                            for b in self.calib]
        return self.cache.float_outputs


def all_zero(outputs: list[torch.Tensor]) -> bool:
    """True when every output tensor is all zeros (no logits to compare a quantized model on)."""
    return all(not bool(o.any()) for o in outputs)


@torch.no_grad()
def calibration_kl(ctx: Context, max_samples: int | None = None) -> float:
    """:func:`~ptqkit.calib.loss.calibration_loss` (the KL) of ``ctx.qmodel`` against the float
    outputs on the calibration set; with ``max_samples``, on its first batches only, as many as
    hold at least that many samples (always at least one batch)."""
    batches = ctx.calib.batches
    if max_samples is not None:
        seen, k = 0, 0
        while k < len(batches) and (k == 0 or seen < max_samples):
            seen, k = seen + batch_size_of(batches[k]), k + 1
        batches = batches[:k]
    return calibration_loss(ctx.float_outputs(), (ctx.calib.forward(ctx.qmodel, b) for b in batches))
