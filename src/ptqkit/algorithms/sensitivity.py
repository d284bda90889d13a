"""Measuring the sensitivity table: loss increase with only one layer lowered (appendix D.2).

For every layer the float prefix runs once (torch.fx splits the traced graph at the layer; the
values the rest of the network needs are cached), then each candidate option runs only the
suffix. Models torch.fx cannot trace fall back to one full forward pass per (layer, option).
All other layers stay float while one is measured, so the cached prefix is exact and
``loss[l, o]`` is the loss increase over the float model (KL to its logits, or the CE increase).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ..calib.capture import record_io
from ..calib.data import CalibrationData, default_forward
from ..calib.engine import LeafTracer, run_nodes
from ..calib.loss import calibration_loss
from ..nn.control import only_enabled, quantizers_disabled
from ..nn.modules import QuantModule
from ..nn.prepare import set_layer_bits
from .ip import Option, SensitivityTable

__all__ = ["SuffixRunner", "LayerState", "snapshot", "restore", "OptionTuner", "calib_loss",
           "measure_table", "TableRequest", "measure_in_context", "Switch", "sizes_table"]

log = logging.getLogger(__name__)
Frontier = list[dict[Any, torch.Tensor]]


class SuffixRunner:
    """Run a model from one quantized layer onwards, with the float prefix cached.

    ``cache(layer)`` -> per batch, the values (fx nodes -> tensors) computed before ``layer`` and
    used from it on; ``run(layer, frontier)`` -> per-batch outputs of the model. ``inputs(...)``
    gives the layer's own (float) input per batch, e.g. for activation ranges or AdaQuant.
    """

    def __init__(self, model: nn.Module, calib: CalibrationData) -> None:
        self.model, self.calib = model, calib
        self.graph: fx.GraphModule | None = None
        try:
            if calib.forward_fn is not default_forward or isinstance(calib.batches[0], dict):
                raise TypeError("custom forward_fn or dict batches")
            self.graph = fx.GraphModule(model, LeafTracer().trace(model))
        except Exception as exc:  # fx raises many types; any failure means: run full passes
            log.info("sensitivity: no fx split (%s); one full pass per (layer, option)",
                     str(exc).split("\n")[0])
            return
        self.nodes = list(self.graph.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((self.index[u] for u in n.users), default=i)
                         for i, n in enumerate(self.nodes)}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        calls: dict[str, list[fx.Node]] = {}
        for n in self.nodes:
            if n.op == "call_module":
                calls.setdefault(str(n.target), []).append(n)
        self.layer_node = {k: v[0] for k, v in calls.items() if len(v) == 1}
        if len(self.placeholders) != 1:
            self.graph = None

    def _split(self, layer: str) -> fx.Node | None:
        return self.layer_node.get(layer) if self.graph is not None else None

    def _execute(self, start: int, stop: int, env: dict[Any, Any]) -> None:
        run_nodes(self.graph, self.nodes, self.last_use, start, stop, env)  # type: ignore[arg-type]

    @torch.no_grad()
    def cache(self, layer: str, quantized: bool = False) -> Frontier:
        """The prefix values per batch: float (default; the table measures one layer against
        float), or with the model's quantizers as they are (``quantized``: the context
        refinement measures one layer switched inside the current configuration)."""
        node = self._split(layer)
        if node is None:
            return [{"batch": b} for b in self.calib]
        p = self.index[node]
        frontier = [n for n in self.nodes[:p] if self.last_use[n] >= p]
        out = []
        with nullcontext() if quantized else quantizers_disabled(self.model):
            for b in self.calib:
                env: dict[Any, Any] = {self.placeholders[0]: _input_of(b)}
                self._execute(0, p, env)
                out.append({n: env[n] for n in frontier})
        return out

    @torch.no_grad()
    def run(self, layer: str, frontier: Frontier) -> Iterator[torch.Tensor]:
        node = self._split(layer)
        for values in frontier:
            if node is None:
                yield self.calib.forward(self.model, values["batch"])
                continue
            env = dict(values)
            self._execute(self.index[node], len(self.nodes), env)
            yield env[self.nodes[-1]]

    @torch.no_grad()
    def inputs(self, layer: str, frontier: Frontier) -> list[torch.Tensor]:
        """The layer's float input for every batch."""
        node = self._split(layer)
        if node is not None:
            return [values[node.args[0]] for values in frontier]  # type: ignore[index]
        mod = self.model.get_submodule(layer)
        with quantizers_disabled(self.model), record_io({layer: mod}) as store:
            for values in frontier:
                self.calib.forward(self.model, values["batch"])
        return store.get(layer, [])


def _input_of(batch: Any) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else batch[0]


def calib_loss(calib: CalibrationData, float_out: list[torch.Tensor],
               outputs: Iterator[torch.Tensor], kind: str) -> float:
    """:func:`~ptqkit.calib.loss.calibration_loss` of the outputs on the calibration set: the KL
    to the float model ('kl'), or the cross-entropy relative to the float model's ('ce', needs
    labelled batches)."""
    labels = [calib.labels(b) for b in calib] if kind == "ce" else None
    return calibration_loss(float_out, outputs, labels)


@dataclass
class LayerState:
    """A layer's bits and the tensors an option set (quantizer parameters; weight and bias only
    when the option's tuner changed them)."""

    option: Option
    tensors: dict[str, torch.Tensor]


def snapshot(layer: QuantModule, base: dict[str, torch.Tensor] | None = None) -> LayerState:
    """Copy of the layer state; with ``base``, a weight or bias equal to it is not copied again
    (quantizer tensors always are: set_spec in restore() resets ``initialized``)."""
    keep = {}
    for k, v in layer.state_dict().items():
        if base is None or k not in ("weight", "bias") or k not in base or not torch.equal(base[k], v):
            keep[k] = v.detach().clone()
    return LayerState((layer.w_bits, layer.a_bits), keep)


@torch.no_grad()
def restore(layer: QuantModule, state: LayerState) -> None:
    """Put a snapshot back: bits first (set_spec resets ``initialized``), then the tensors."""
    set_layer_bits(layer, state.option[0], state.option[1])
    own = dict(layer.named_parameters()) | dict(layer.named_buffers())
    for k, v in state.tensors.items():
        if k == "bias" and layer.bias is None:
            layer.ensure_bias()
            own["bias"] = layer.bias  # type: ignore[assignment]
        own[k].copy_(v)


# tuner(layer, option, inputs): put the layer in its state for ``option`` given its float inputs
# (one tensor per calibration batch); e.g. set ranges for these bits, or run AdaQuant.
OptionTuner = Callable[[QuantModule, Option, list[torch.Tensor]], None]


@dataclass
class TableRequest:
    """What to measure: options per layer (pinned layers get one), loss kind, the tuner."""

    options: list[Option]
    allowed: dict[str, list[Option]]
    loss: str
    tuner: OptionTuner
    keep_states: bool = True


@contextmanager
def _layer_restored(layer: QuantModule) -> Iterator[LayerState]:
    orig = snapshot(layer)
    try:
        yield orig
    finally:
        restore(layer, orig)


def measure_table(model: nn.Module, calib: CalibrationData, float_out: list[torch.Tensor],
                  request: TableRequest) -> tuple[SensitivityTable, dict[tuple[str, Option], LayerState]]:
    """One suffix pass per (layer, option); every layer is restored afterwards.

    Returns the table (loss increase, params, MACs per sample) and the tuned layer state per
    (layer, option), for stitching the chosen configuration without tuning again.
    """
    modules = dict(model.named_modules())
    missing = [n for n in request.allowed if n not in modules]
    if missing:
        raise ValueError(f"the table request names layers the model does not have: {missing}")
    # the request's order (execution order), not named_modules() order: a table saved from one
    # run must line up with quant_layers() of the next (ResNet downsample runs after conv2)
    layers: dict[str, QuantModule] = {n: modules[n] for n in request.allowed}  # type: ignore[misc]
    runner = SuffixRunner(model, calib)
    loss = np.zeros((len(layers), len(request.options)))
    states: dict[tuple[str, Option], LayerState] = {}
    total = sum(len(v) for v in request.allowed.values())
    bar = tqdm(total=total, desc="sensitivity", disable=None, leave=False)
    t0 = last = time.perf_counter()
    done = 0
    for i, (name, layer) in enumerate(layers.items()):
        frontier = runner.cache(name)
        inputs = runner.inputs(name, frontier)
        with _layer_restored(layer) as orig, only_enabled(model, [name]):
            for opt in request.allowed[name]:
                request.tuner(layer, opt, inputs)
                if request.keep_states:
                    states[(name, opt)] = snapshot(layer, orig.tensors)
                out = runner.run(name, frontier)
                loss[i, request.options.index(opt)] = calib_loss(calib, float_out, out, request.loss)
                restore(layer, orig)
                bar.update(1)
                done += 1
        del frontier, inputs
        now = time.perf_counter()
        if now - last >= 10 or i == len(layers) - 1:  # a log line for runs off a terminal
            last = now
            log.info("sensitivity table: %d/%d entries (%d/%d layers), %.0f s, ETA %.0f s", done,
                     total, i + 1, len(layers), now - t0, (now - t0) / max(done, 1) * (total - done))
    bar.close()
    table = sizes_table(model, calib, list(request.options), request.allowed)
    table.loss = loss
    table.meta = {"loss": request.loss, "calib_samples": calib.num_samples}
    return table, states


def sizes_table(model: nn.Module, calib: CalibrationData, options: list[Option],
                allowed: dict[str, list[Option]]) -> SensitivityTable:
    """The table's sizes (params, MACs, allowed options) with zero losses: enough to check a
    compression or BOPs budget before anything is measured (one forward pass for the MACs)."""
    modules = dict(model.named_modules())
    layers: dict[str, QuantModule] = {n: modules[n] for n in allowed}  # type: ignore[misc]
    ok = np.array([[o in allowed[n] for o in options] for n in layers])
    return SensitivityTable(list(layers), list(options), np.zeros(ok.shape),
                            np.array([m.weight.numel() for m in layers.values()]),
                            np.array(_macs(model, layers, calib)), ok, {})


@torch.no_grad()
def _macs(model: nn.Module, layers: dict[str, QuantModule], calib: CalibrationData) -> list[int]:
    batch = calib.batches[0]
    mods: dict[str, nn.Module] = dict(layers)
    with quantizers_disabled(model), record_io(mods, inputs=False, outputs=True) as store:
        calib.forward(model, batch)
    return [sum(layers[n].macs_per_sample(o.shape) for o in store.get(n + ":out", []))
            for n in layers]


# switch(layer, option): put the layer in its state for ``option``; option None = back to the
# state it has in the current configuration.
Switch = Callable[[str, Option | None], None]


@torch.no_grad()
def measure_in_context(model: nn.Module, calib: CalibrationData, float_out: list[torch.Tensor],
                       loss: str, probes: dict[str, list[Option]],
                       switch: Switch) -> tuple[float, dict[tuple[str, Option], float]]:
    """Loss changes of single-layer switches inside the current configuration of ``model``.

    Returns L(c) and, for every (layer l, option o) in ``probes``, dL_c[l, o] = L(c with l -> o)
    - L(c) with all other layers as they are (quantized). One prefix pass per layer with the
    current quantizers (torch.fx split, as for the table), one suffix pass per option; the layer
    is switched back in ``finally``. ``probes`` in execution order; layers absent are not probed.
    """
    runner = SuffixRunner(model, calib)
    base = calib_loss(calib, float_out, (calib.forward(model, b) for b in calib), loss)
    out: dict[tuple[str, Option], float] = {}
    bar = tqdm(total=sum(map(len, probes.values())), desc="refine", disable=None, leave=False)
    for name, options in probes.items():
        if not options:
            continue
        frontier = runner.cache(name, quantized=True)
        try:
            for opt in options:
                switch(name, opt)
                out[(name, opt)] = calib_loss(calib, float_out, runner.run(name, frontier), loss) - base
                bar.update(1)
        finally:
            switch(name, None)
        del frontier
    bar.close()
    return base, out
