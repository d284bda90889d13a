"""The model as cached segments: one pass per segment per batch, never a restarted forward pass.

``torch.fx`` traces the model with every quantized layer as one node. The nodes between two
consecutive quantized layers form a segment. A :class:`Frontier` holds, for every calibration
batch, the values that were computed before a position in the graph and are still used at or
after it. :meth:`SegmentEngine.advance` runs the next segment from the frontier, so walking the
whole network costs one forward pass per batch in total, O(L) in the number of layers, where a
restarted forward pass per layer costs O(L^2).

Frontiers live in an :class:`~ptqkit.calib.cache.ActivationCache`: in memory up to a budget, the
rest spilled to disk. Models that cannot be traced (or use a custom ``forward_fn``, dict batches,
several inputs, or call a quantized layer more than once) have no engine: ``SegmentEngine.build``
returns None and callers fall back to full forward passes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import fx, nn

from ..nn.modules import QuantModule
from .cache import ActivationCache
from .data import CalibrationData, default_forward

__all__ = ["SegmentEngine", "Frontier", "LeafTracer", "run_nodes"]

log = logging.getLogger(__name__)


class LeafTracer(fx.Tracer):
    """fx tracer that keeps every quantized layer as one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantModule) or super().is_leaf_module(m, qualname)


@dataclass
class Frontier:
    """Per batch, the live values at graph position ``position``: the tensors of ``nodes`` (in
    that order) in ``tensors`` (one item per calibration batch), and any non-tensor values (sizes,
    tuples) in ``extras``, which stay in memory."""

    position: int
    nodes: list[fx.Node]
    tensors: ActivationCache
    extras: list[dict[fx.Node, Any]]

    def envs(self) -> Iterator[dict[fx.Node, Any]]:
        """The live values of each batch as {node: value}."""
        for item, extra in zip(self.tensors, self.extras):
            yield {**dict(zip(self.nodes, item)), **extra}

    def close(self) -> None:
        self.tensors.close()


class SegmentEngine:
    """Walks ``model`` segment by segment over the calibration batches.

    The engine traces ``model`` once; the traced graph shares ``model``'s modules and
    parameters, so changes made to a layer (weights, quantizers) are seen by later passes.
    """

    def __init__(self, model: nn.Module, calib: CalibrationData, graph: fx.GraphModule,
                 budget_bytes: int = 1 << 30, spill_dir: str | Path | None = None) -> None:
        self.model, self.calib, self.graph = model, calib, graph
        self.budget_bytes, self.spill_dir = budget_bytes, spill_dir
        self.nodes = list(graph.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.last_use = {n: max((self.index[u] for u in n.users), default=i)
                         for i, n in enumerate(self.nodes)}
        self.input_node = next(n for n in self.nodes if n.op == "placeholder")
        self.layer_node: dict[str, fx.Node] = {
            str(n.target): n for n in self.nodes if n.op == "call_module"
            and isinstance(model.get_submodule(str(n.target)), QuantModule)}

    @classmethod
    def build(cls, model: nn.Module, calib: CalibrationData, budget_bytes: int = 1 << 30,
              spill_dir: str | Path | None = None) -> SegmentEngine | None:
        """An engine for ``model``, or None (with the reason logged) when it cannot have one."""
        try:
            if calib.forward_fn is not default_forward or isinstance(calib.batches[0], dict):
                raise TypeError("custom forward_fn or dict batches")
            graph = fx.GraphModule(model, LeafTracer().trace(model))
        except Exception as exc:  # fx raises many types; any failure means: full passes
            log.info("no segment engine (%s); full forward passes", str(exc).split("\n")[0])
            return None
        if sum(n.op == "placeholder" for n in graph.graph.nodes) != 1:
            log.info("no segment engine (the model takes several inputs); full forward passes")
            return None
        calls: dict[str, int] = {}
        for n in graph.graph.nodes:
            if n.op == "call_module":
                calls[str(n.target)] = calls.get(str(n.target), 0) + 1
        if any(c > 1 and isinstance(model.get_submodule(t), QuantModule) for t, c in calls.items()):
            log.info("no segment engine (a quantized layer is called more than once)")
            return None
        return cls(model, calib, graph, budget_bytes, spill_dir)

    def layers_in_order(self) -> list[str]:
        """The quantized layers in graph order (a topological order of the model)."""
        return [name for name, _ in sorted(self.layer_node.items(), key=lambda kv: self.index[kv[1]])]

    def _cache(self) -> ActivationCache:
        return ActivationCache(self.budget_bytes, self.spill_dir)

    @torch.no_grad()
    def start(self) -> Frontier:
        """The frontier before the first node: the model input of every batch."""
        frontier = Frontier(0, [self.input_node], self._cache(), [])
        for batch in self.calib:
            frontier.tensors.append(batch if isinstance(batch, torch.Tensor) else batch[0])
            frontier.extras.append({})
        return frontier

    def _live(self, position: int) -> list[fx.Node]:
        return [n for n in self.nodes[:position] if self.last_use[n] >= position]

    @torch.no_grad()
    def advance(self, frontier: Frontier, layer: str) -> Frontier:
        """Run the segment from ``frontier`` up to (not including) ``layer``'s node; the old
        frontier is closed and the new one returned. ``layer`` must not lie behind it."""
        stop = self.index[self.layer_node[layer]]
        if stop < frontier.position:
            raise ValueError(f"layer {layer!r} lies before the frontier; advance in graph order")
        live = self._live(stop)
        new: Frontier | None = None
        for env in frontier.envs():
            self._execute(frontier.position, stop, env)
            if new is None:
                new = Frontier(stop, [n for n in live if isinstance(env[n], torch.Tensor)],
                               self._cache(), [])
            new.tensors.append(*(env[n] for n in new.nodes))
            new.extras.append({n: env[n] for n in live if not isinstance(env[n], torch.Tensor)})
        frontier.close()
        assert new is not None, "calibration data has at least one batch"
        return new

    def layer_inputs(self, frontier: Frontier, layer: str) -> Iterator[torch.Tensor]:
        """The input of ``layer`` for every batch, from a frontier standing at that layer."""
        node = self.layer_node[layer]
        if frontier.position != self.index[node]:
            raise ValueError(f"the frontier is not at layer {layer!r}")
        for env in frontier.envs():
            yield env[cast(fx.Node, node.args[0])]

    def _execute(self, start: int, stop: int, env: dict[Any, Any]) -> None:
        run_nodes(self.graph, self.nodes, self.last_use, start, stop, env)


def run_nodes(graph: fx.GraphModule, nodes: list[fx.Node], last_use: dict[fx.Node, int],
              start: int, stop: int, env: dict[Any, Any]) -> None:
    """Run ``nodes[start:stop]`` of ``graph`` on ``env`` ({node: value}, updated in place); a
    value is dropped from ``env`` after its last use (``last_use``: node -> index of its last
    user)."""
    interp = fx.Interpreter(graph)
    interp.env = env
    for i in range(start, stop):
        node = nodes[i]
        if node.op == "placeholder":
            continue
        env[node] = interp.run_node(node)
        for arg in node.all_input_nodes:
            if last_use[arg] <= i and arg in env and node.op != "output":
                del env[arg]
