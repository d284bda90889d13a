"""Recipe -> ordered Steps; runs them on a copy of the user's model and reports."""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .algorithms import STEPS
from .algorithms.base import (
    Context,
    Report,
    Step,
    check_fields,
    check_string_keys,
    check_type,
    options_from_dict,
    show_value,
)
from .algorithms.range_init import RangeOptions
from .calib.data import CalibrationData
from .core.quantizer import Quantizer
from .evaluate import float_layer_outputs, layer_sqnr
from .nn.modules import quant_layers
from .nn.prepare import LayerPolicy, PTQState, prepare, set_layer_bits

__all__ = ["Recipe", "StepSpec", "PRESETS", "quantize", "layer_bits", "rebuild"]

log = logging.getLogger(__name__)
RECIPE_VERSION = 1


def _check_options(name: str, options: Mapping[Any, Any], where: str = "") -> None:
    """Validate options of step ``name`` against its Options dataclass: option names, the type
    of each value (from the annotations), then the Options' own checks (nested options too).
    Raises one-line ValueErrors starting with ``where`` (default: the step)."""
    where = where or f"step {name!r}"
    check_type(f"{where} options", options, Mapping[Any, Any])
    check_string_keys(f"{where} option name", options)
    check_fields(STEPS[name].Options, lambda key: f"{where} option {key!r}", options)
    options_from_dict(STEPS[name], dict(options))


def _plain(value: Any) -> Any:
    """An option value as YAML writes it: tuples as lists, mappings as dicts."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _step_of_options(options: Any) -> str:
    """The registry name of the one step whose Options class ``options`` is an instance of."""
    names = [n for n, cls in STEPS.items() if type(options) is cls.Options]
    if len(names) != 1:
        what = f"the Options of steps {names}" if names else "the Options of no step"
        raise ValueError(f"{type(options).__name__} is {what}; give the step by name: "
                         "StepSpec(name, options)")
    return names[0]


@dataclass(frozen=True)
class StepSpec:
    """A step by registry name plus its options: a mapping of option names to values, or the
    step's Options object (e.g. ``AdaQuantOptions(iters=100)``), kept as the mapping of its
    fields that differ from the defaults. Options are validated against the step's Options
    (names, value types from its annotations, its own checks); invalid ones raise a one-line
    ValueError."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_type("step name", self.name, str)
        if self.name not in STEPS:
            raise ValueError(f"unknown step {self.name!r}; expected one of {sorted(STEPS)}")
        opts: Any = self.options
        if dataclasses.is_dataclass(opts) and not isinstance(opts, type):
            cls = STEPS[self.name].Options
            if type(opts) is not cls:
                raise ValueError(f"step {self.name!r} takes {cls.__name__}, got "
                                 f"{type(opts).__name__}; pass that step's Options or a mapping")
            defaults = cls()
            object.__setattr__(self, "options", {
                f.name: _plain(getattr(opts, f.name)) for f in dataclasses.fields(opts)
                if getattr(opts, f.name) != getattr(defaults, f.name)})
        _check_options(self.name, self.options)

    @classmethod
    def of(cls, options: Any) -> StepSpec:
        """The step whose Options class ``options`` is an instance of, with those options."""
        return cls(_step_of_options(options), options)

    def build(self) -> Step[Any]:
        """The step, with its Options built from ``options``."""
        step = STEPS[self.name]
        return step(options_from_dict(step, dict(self.options)))


# Presets: extra steps run after range initialisation. Later methods add their presets here.
PRESETS: dict[str, tuple[StepSpec, ...]] = {"default": ()}
# Pipelines of Hubara et al. (section 4): light = ranges + IP + BN tuning (no backward pass);
# advanced = parallel AdaQuant per candidate bit width + IP + BN tuning + bias tuning.
PRESETS["light"] = (StepSpec("mixed_precision", {"compression": 0.13}), StepSpec("bn_tuning"))
PRESETS["advanced"] = (StepSpec("mixed_precision", {"compression": 0.13, "tuner": "adaquant"}),
                       StepSpec("bn_tuning"), StepSpec("bias_tuning"))


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a quantization run.

    Weights are per output channel, activations per tensor and asymmetric. ``w_symmetric``
    None (the default) makes 8-bit weights symmetric, which ONNX Runtime's int8 kernels run at
    full speed, and lower-bit weights asymmetric (exported exactly as int8 q - z); True or False
    fixes it for every layer. The first and last quantized layers stay at 8 bits unless
    ``first_last_8bit`` is False.
    ``steps`` run after the range initialisation, in order; each may be given as a StepSpec, a
    step name, a ``{name, options}`` mapping or a step's Options object (``AdaQuantOptions()``),
    and is kept as a StepSpec.
    """

    w_bits: int = 8
    a_bits: int = 8
    w_symmetric: bool | None = None
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
        check_type("recipe key 'steps'", self.steps, tuple[Any, ...])
        object.__setattr__(self, "steps", tuple(_step_spec(s) for s in self.steps))

    def policy(self) -> LayerPolicy:
        return LayerPolicy(self.w_bits, self.a_bits, self.w_symmetric, self.a_symmetric,
                           self.first_last_8bit, tuple(self.include), tuple(self.exclude),
                           dict(self.overrides))

    def range_options(self) -> RangeOptions:
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
        check_type("recipe", d, Mapping[Any, Any])
        check_string_keys("recipe key", d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown recipe key(s) {unknown}; valid keys: {sorted(known)}")
        d = dict(d)
        if d.get("steps") is not None and not isinstance(d["steps"], (list, tuple)):
            raise ValueError(f"recipe key 'steps': expected a list of steps, got {show_value(d['steps'])}")
        check_fields(cls, lambda key: f"recipe key {key!r}", d,
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
        d["steps"] = [{"name": s.name, "options": _plain(s.options)} for s in self.steps]
        return d

    def with_steps(self, *steps: Any) -> Recipe:
        """The recipe with ``steps`` appended: StepSpecs, step names, ``{name, options}``
        mappings or steps' Options objects."""
        return dataclasses.replace(self, steps=self.steps + tuple(_step_spec(s) for s in steps))


def _step_spec(s: Any) -> StepSpec:
    """A StepSpec from a step name, a ``{name: ..., options: {...}}`` mapping (options may be
    null or left out) or a step's Options object."""
    if isinstance(s, StepSpec):
        return s
    if dataclasses.is_dataclass(s) and not isinstance(s, type):
        return StepSpec.of(s)
    if isinstance(s, str):
        return StepSpec(s)
    if isinstance(s, Mapping) and "name" in s:
        extra = [k for k in s if k not in ("name", "options")]
        if extra:
            raise ValueError(f"step {s['name']!r}: unknown key(s) {extra}; a step takes only "
                             "'name' and 'options'")
        options = s.get("options")
        return StepSpec(s["name"], {} if options is None else options)
    raise ValueError("a step must be a name or {name: ..., options: {...}}, got " + show_value(s))


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
    state: PTQState = qmodel.ptq  # type: ignore[assignment]
    report = Report(recipe=recipe.to_dict(), stays_float=list(state.stays_float))
    if state.bn_unfolded_reason:
        report.notes.append("BatchNorm left unfolded: " + state.bn_unfolded_reason)
    report.notes.append("float: residual adds, pooling, activations, normalisation, softmax; "
                        "biases 32-bit")
    for name, layer in quant_layers(qmodel).items():
        report.layer(name).update(type=type(layer).__name__, w_bits=layer.w_bits,
                                  a_bits=layer.a_bits, bn_folded=layer.folded_bn is not None)
    ctx = Context(qmodel, data, report, recipe.seed, recipe=recipe)
    ctx.snapshot_float()
    reference = float_layer_outputs(qmodel, data)  # before any step adapts the float weights
    steps = [STEPS["ranges"](recipe.range_options()), *(s.build() for s in recipe.steps)]
    for step in steps:
        t = time.perf_counter()
        log.info("step %s started", step.name)
        summary = step.run(ctx)
        report.steps.append({"step": step.name, **summary, "seconds": time.perf_counter() - t})
        log.info("step %s done in %.1fs", step.name, time.perf_counter() - t)
        if "rescales_channels" in step.effects and summary.get("kept", True):
            with ctx.as_float():  # layer outputs moved channel by channel: a new reference
                reference = float_layer_outputs(qmodel, data)
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
    state: PTQState = qmodel.ptq  # type: ignore[assignment]
    cov = state.coverage(qmodel)
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
        set_layer_bits(layers[name], int(w), int(a))
    return qmodel
