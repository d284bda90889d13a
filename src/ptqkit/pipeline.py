"""Recipe -> ordered Steps; runs them on a copy of the user's model and reports."""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .algorithms import STEPS
from .algorithms.base import Context, Report, options_from_dict
from .calib.data import CalibrationData
from .core.quantizer import Quantizer
from .evaluate import float_layer_outputs, layer_sqnr
from .nn.modules import quant_layers
from .nn.prepare import LayerPolicy, prepare

__all__ = ["Recipe", "StepSpec", "PRESETS", "quantize", "layer_bits", "rebuild"]

log = logging.getLogger(__name__)
RECIPE_VERSION = 1


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


def _show(value: Any) -> str:
    """The given value for a one-line message: its repr (shortened) and its type."""
    text = repr(value)
    text = text if len(text) <= 80 else text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _check_type(where: str, value: Any, hint: Any) -> None:
    """Raise a one-line ValueError naming ``where`` unless ``value`` has the type ``hint``."""
    if not _matches(value, hint):
        note = " (numbers must be finite)" if _nonfinite(value) else ""
        raise ValueError(f"{where}: expected {_describe(hint)}{note}, got {_show(value)}")


def _check_string_keys(where: str, d: Mapping[Any, Any]) -> None:
    for key in d:
        if not isinstance(key, str):
            raise ValueError(f"{where} {_show(key)} is not a string; write the name as text")


def _check_fields(cls: type, where: Callable[[str], str], values: Mapping[str, Any],
                  skip: tuple[str, ...] = ()) -> None:
    """Check each value in ``values`` against the annotation of the field of ``cls`` it names
    (unknown names are left to the caller)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in values and f.name not in skip:
            _check_type(where(f.name), values[f.name], hints[f.name])


# Options that a step passes on to another step's Options: (step, option) -> that step.
_NESTED_OPTIONS = {("mixed_precision", "tuner_options"): "adaquant"}


def _check_options(name: str, options: Mapping[Any, Any], where: str = "") -> None:
    """Validate options of step ``name`` against its Options dataclass: option names, the type
    of each value (from the annotations), then the Options' own checks. Raises one-line
    ValueErrors starting with ``where`` (default: the step)."""
    where = where or f"step {name!r}"
    _check_type(f"{where} options", options, Mapping[Any, Any])
    _check_string_keys(f"{where} option name", options)
    _check_fields(STEPS[name].Options, lambda key: f"{where} option {key!r}", options)
    options_from_dict(STEPS[name], dict(options))
    for (step, key), inner in _NESTED_OPTIONS.items():
        if step == name and options.get(key):
            _check_options(inner, options[key], f"{where} {key} ({inner})")


@dataclass(frozen=True)
class StepSpec:
    """A step by registry name plus its options (validated against the step's Options: names,
    value types from its annotations, its own checks); invalid ones raise a one-line ValueError."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_type("step name", self.name, str)
        if self.name not in STEPS:
            raise ValueError(f"unknown step {self.name!r}; expected one of {sorted(STEPS)}")
        _check_options(self.name, self.options)


# Presets: extra steps run after range initialisation. Later methods add their presets here.
PRESETS: dict[str, tuple[StepSpec, ...]] = {"default": ()}
# Pipelines of Hubara et al. (section 4): light = ranges + IP + BN tuning (no backward pass);
# advanced = parallel AdaQuant per candidate bit width + IP + BN tuning + bias tuning.
PRESETS["light"] = (StepSpec("mixed_precision", {"compression": 0.13}), StepSpec("bn_tuning"))
PRESETS["advanced"] = (StepSpec("mixed_precision", {"compression": 0.13, "tuner": "adaquant"}),
                       StepSpec("bn_tuning"), StepSpec("bias_tuning"))


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a quantization run (see ALGORITHMS.md, "Setting").

    Weights are per output channel and activations per tensor, both asymmetric by default; the
    first and last quantized layers stay at 8 bits unless ``first_last_8bit`` is False.
    """

    w_bits: int = 8
    a_bits: int = 8
    w_symmetric: bool = False
    a_symmetric: bool = False
    first_last_8bit: bool = True
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    w_range: str = "mse"
    a_range: str = "mse"
    percentile: float = 99.99
    calib_size: int | None = None
    seed: int = 0
    steps: tuple[StepSpec, ...] = ()
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise ValueError(f"recipe version {self.version} is not supported (expected "
                             f"{RECIPE_VERSION}); write the recipe again with this ptqkit")
        self.policy()  # validates bits and overrides
        self.range_options()  # validates range methods
        if self.calib_size is not None and self.calib_size < 1:
            raise ValueError(f"calib_size must be >= 1, got {self.calib_size}")

    def policy(self) -> LayerPolicy:
        return LayerPolicy(self.w_bits, self.a_bits, self.w_symmetric, self.a_symmetric,
                           self.first_last_8bit, tuple(self.include), tuple(self.exclude),
                           dict(self.overrides))

    def range_options(self) -> Any:
        return options_from_dict(STEPS["ranges"], {
            "weights": self.w_range, "activations": self.a_range, "percentile": self.percentile})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Recipe:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls.from_dict({"steps": [dataclasses.asdict(s) for s in PRESETS[name]], **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        """The recipe of a mapping as YAML gives it. Every value must have its field's type (a
        bool a YAML bool, a number a number, a list a list, a string a string; ``include`` /
        ``exclude`` also take one string, ``steps`` / ``overrides`` also null); anything else
        raises a one-line ValueError naming the key, the expected type and the given value."""
        _check_type("recipe", d, Mapping[Any, Any])
        _check_string_keys("recipe key", d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown recipe key(s) {unknown}; valid keys: {sorted(known)}")
        d = dict(d)
        if d.get("steps") is not None and not isinstance(d["steps"], (list, tuple)):
            raise ValueError(f"recipe key 'steps': expected a list of steps, got {_show(d['steps'])}")
        _check_fields(cls, lambda key: f"recipe key {key!r}", d,
                      skip=("steps",) + tuple(k for k in ("overrides",) if d.get(k) is None))
        for key in ("include", "exclude"):
            if key in d:
                d[key] = (d[key],) if isinstance(d[key], str) else tuple(d[key])
        if "overrides" in d:
            d["overrides"] = {k: tuple(v) for k, v in dict(d["overrides"] or {}).items()}
        if "steps" in d:
            d["steps"] = tuple(_step_spec(s) for s in d["steps"] or ())
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        import yaml

        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise ValueError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["include"], d["exclude"] = list(self.include), list(self.exclude)
        d["overrides"] = {k: list(v) for k, v in self.overrides.items()}
        d["steps"] = [{"name": s.name, "options": dict(s.options)} for s in self.steps]
        return d

    def with_steps(self, *steps: StepSpec | str) -> Recipe:
        return dataclasses.replace(self, steps=self.steps + tuple(_step_spec(s) for s in steps))


def _step_spec(s: Any) -> StepSpec:
    """A StepSpec from a step name or a ``{name: ..., options: {...}}`` mapping (options may be
    null or left out)."""
    if isinstance(s, StepSpec):
        return s
    if isinstance(s, str):
        return StepSpec(s)
    if isinstance(s, Mapping) and "name" in s:
        extra = [k for k in s if k not in ("name", "options")]
        if extra:
            raise ValueError(f"step {s['name']!r}: unknown key(s) {extra}; a step takes only "
                             "'name' and 'options'")
        options = s.get("options")
        return StepSpec(s["name"], {} if options is None else options)
    raise ValueError("a step must be a name or {name: ..., options: {...}}, got " + _show(s))


def _as_calib(calib: Any, recipe: Recipe) -> CalibrationData:
    if isinstance(calib, CalibrationData):
        return calib if recipe.calib_size is None else CalibrationData(calib, recipe.calib_size)
    return CalibrationData(calib, recipe.calib_size)


def quantize(model: nn.Module, calib: CalibrationData | Iterable[Any] | torch.Tensor,
             recipe: Recipe | None = None,
             forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None) -> nn.Module:
    """Quantize a copy of ``model`` with ``recipe`` using the unlabeled ``calib`` data.

    Returns the quantized model (the input model is untouched) with ``.report`` attached.
    ``calib``: a DataLoader, an iterable of batches, a Tensor of inputs or a CalibrationData.
    """
    recipe = recipe or Recipe()
    data = _as_calib(calib, recipe)
    if forward_fn is not None:
        data.forward_fn = forward_fn
    torch.manual_seed(recipe.seed)
    t0 = time.perf_counter()
    qmodel = prepare(model, recipe.policy(), lambda m: data.forward(m, data.batches[0]))
    report = Report(recipe=recipe.to_dict(), stays_float=list(qmodel.ptq.stays_float))
    if qmodel.ptq.bn_unfolded_reason:
        report.notes.append("BatchNorm left unfolded: " + qmodel.ptq.bn_unfolded_reason)
    report.notes.append("float: residual adds, pooling, activations, normalisation, softmax; "
                        "biases 32-bit")
    for name, layer in quant_layers(qmodel).items():
        report.layer(name).update(type=type(layer).__name__, w_bits=layer.w_bits,
                                  a_bits=layer.a_bits, bn_folded=layer.folded_bn is not None)
    ctx = Context(qmodel, data, report, recipe.seed)
    ctx.snapshot_float()
    reference = float_layer_outputs(qmodel, data)  # before any step adapts the float weights
    steps = [STEPS["ranges"](recipe.range_options())]
    steps += [STEPS[s.name](options_from_dict(STEPS[s.name], dict(s.options))) for s in recipe.steps]
    for step in steps:
        t = time.perf_counter()
        summary = step.run(ctx)
        report.steps.append({"step": step.name, **summary, "seconds": time.perf_counter() - t})
        log.info("step %s done in %.1fs", step.name, time.perf_counter() - t)
    _check_scales(qmodel)
    for name, layer in quant_layers(qmodel).items():
        report.layer(name).update(w_bits=layer.w_bits, a_bits=layer.a_bits)
    for name, value in layer_sqnr(qmodel, data, reference=reference).items():
        report.layer(name)["sqnr_db"] = value
    report.coverage = _coverage(qmodel, warn=recipe.w_bits < 16)
    report.steps.append({"step": "total", "seconds": time.perf_counter() - t0})
    qmodel.report = report  # type: ignore[assignment]
    return qmodel


def _check_scales(qmodel: nn.Module) -> None:
    """Raise a one-line ValueError naming the layer and quantizer when an active quantizer's
    scale is not finite and > 0 (NaN/Inf weights, or activations that overflow float32)."""
    for name, q in qmodel.named_modules():
        if not (isinstance(q, Quantizer) and q.active):
            continue
        scale = q.scale.detach().reshape(-1)
        bad = (~torch.isfinite(scale) | (scale <= 0)).nonzero()
        if bad.numel():
            layer, _, which = name.rpartition(".")
            channel = int(bad[0, 0])
            where = f" (channel {channel} of {scale.numel()})" if scale.numel() > 1 else ""
            raise ValueError(f"layer {layer or name!r}: quantizer {which or name} got scale "
                             f"{float(scale[channel])}{where}, expected a finite scale > 0; look "
                             "for NaN/Inf weights or activations that overflow float32 in it")


LOW_COVERAGE = 0.9  # quantize() warns when a smaller share of the model's MACs runs quantized


class LowCoverageWarning(UserWarning):
    """A large share of the model's MACs stays float (see ``Report.coverage``)."""


def _coverage(qmodel: nn.Module, warn: bool) -> dict[str, Any]:
    cov = qmodel.ptq.coverage(qmodel)
    if warn and cov.fraction < LOW_COVERAGE:
        warnings.warn(f"only {cov.describe()}; quantize those layers (include/exclude, "
                      "supported types) or they run in float", LowCoverageWarning, stacklevel=3)
    return {"fraction": cov.fraction, "quantized_macs": cov.quantized_macs,
            "total_macs": cov.total_macs, "summary": cov.describe(),
            "float_layers": [{"name": n, "macs": m, "reason": r} for n, m, r in cov.float_layers]}


def layer_bits(qmodel: nn.Module) -> dict[str, tuple[int, int]]:
    """{layer name: (w_bits, a_bits)} of a quantized model, in execution order."""
    return {n: (m.w_bits, m.a_bits) for n, m in quant_layers(qmodel).items()}


def rebuild(model: nn.Module, recipe: Recipe, bits: dict[str, tuple[int, int]],
            example_input: Any, forward_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
            ) -> nn.Module:
    """An empty quantized skeleton of ``model`` matching a saved run: same layers and bits.

    Load the saved state dict into it afterwards. ``example_input``: one batch the model accepts
    (used to record the layer order).
    """
    data = CalibrationData([example_input], forward_fn=forward_fn)
    policy = dataclasses.replace(recipe.policy(), overrides={}, first_last_8bit=False)
    qmodel = prepare(model, policy, lambda m: data.forward(m, data.batches[0]))
    layers = quant_layers(qmodel)
    missing = sorted(set(bits) - set(layers))
    if missing:
        raise ValueError(f"the saved run names layers the model does not have: {missing}; "
                         "was it saved from a different model?")
    for name, (w, a) in bits.items():
        layers[name].w_quant.set_spec(layers[name].w_quant.spec.with_bits(int(w)))
        layers[name].a_quant.set_spec(layers[name].a_quant.spec.with_bits(int(a)))
    return qmodel
