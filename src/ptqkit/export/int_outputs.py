"""Step "int_outputs": quantize the outputs that ONNX Runtime needs to run every conv in integers.

ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv only when the conv output is quantized. In the
simulated model a conv output is quantized only where it enters another quantized layer (that
layer's input quantizer); a conv whose output feeds a residual add, a pooling or the model output
would run as a float kernel. This step gives exactly those layers an 8-bit per-tensor output
quantizer (``QuantModule.o_quant``), calibrated on the data, so that the simulated model and the
deployed integer model stay the same function. It changes the simulated model (one more rounding
per such layer); the report lists the layers. Run it as the last step of a recipe.

If the only consumer of the conv is a ReLU/ReLU6, the range is taken after the activation: with a
zero-point of 0 and a range inside [0, 6], Q(y) = Q(act(y)), so the activation stays exact.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..algorithms.base import Context, Step, register_step
from ..core.quantizer import Quantizer
from ..core.spec import QuantSpec
from ..nn.modules import QuantConv1d, QuantConv2d, QuantModule, quant_layers
from ..ranges import get_range_method

__all__ = ["IntOutputsOptions", "IntOutputs", "layers_needing_output_quant", "attach_output_quantizers"]

log = logging.getLogger(__name__)
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_ACT_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", F.relu6: "relu6", torch.relu_: "relu"}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantModule) or super().is_leaf_module(m, qualname)


def _activation(node: fx.Node, mods: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return _ACT_MODULES.get(type(mods[str(node.target)]))  # type: ignore[arg-type]
    if node.op == "call_function":
        return _ACT_FUNCTIONS.get(node.target)  # type: ignore[arg-type]
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def _users(node: fx.Node, mods: dict[str, nn.Module]) -> list[fx.Node]:
    """Consumers of ``node``, looking through Identity modules (folded BatchNorms)."""
    out = []
    for u in node.users:
        if u.op == "call_module" and isinstance(mods[str(u.target)], nn.Identity):
            out += _users(u, mods)
        else:
            out.append(u)
    return out


def _feeds_quantized_inputs(nodes: list[fx.Node], mods: dict[str, nn.Module]) -> bool:
    return bool(nodes) and all(
        n.op == "call_module" and isinstance(mods[str(n.target)], QuantModule)
        and mods[str(n.target)].a_quant.active for n in nodes)  # type: ignore[union-attr]


def layers_needing_output_quant(qmodel: nn.Module) -> dict[str, str | None]:
    """{conv layer name: activation applied to its output ('relu', 'relu6' or None)} for every
    quantized conv whose output does not go (through at most one ReLU/ReLU6) only into
    quantized layer inputs. Raises ValueError if torch.fx cannot trace the model."""
    try:
        graph = _Tracer().trace(qmodel)
    except Exception as exc:  # fx raises many exception types on untraceable code
        raise ValueError(f"int_outputs needs a torch.fx-traceable model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]})") from exc
    mods = dict(qmodel.named_modules())
    need: dict[str, str | None] = {}
    for node in graph.nodes:
        mod = mods.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(mod, (QuantConv1d, QuantConv2d)) or not mod.w_quant.active:
            continue
        users, act = _users(node, mods), None
        if len(users) == 1 and (act := _activation(users[0], mods)) is not None:
            users = _users(users[0], mods)
        if not _feeds_quantized_inputs(users, mods):
            need[str(node.target)] = act
    return need


def _after(act: str | None, y: torch.Tensor) -> torch.Tensor:
    if act == "relu":
        return torch.relu(y)
    return torch.clamp(y, 0.0, 6.0) if act == "relu6" else y


@torch.no_grad()
def _collect_outputs(ctx: Context, need: dict[str, str | None],
                     max_samples: int) -> dict[str, torch.Tensor]:
    """A random subsample (plus exact min and max) of every listed layer's (activated) output."""
    layers = quant_layers(ctx.qmodel)
    g = torch.Generator().manual_seed(ctx.seed)
    per_batch = max(1, max_samples // max(1, len(ctx.calib)))
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in need}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            y = _after(need[name], out.detach()).reshape(-1).float()
            idx = torch.randint(0, y.numel(), (min(per_batch, y.numel()),), generator=g)
            parts[name] += [y[idx], y.min().reshape(1), y.max().reshape(1)]
        return fn

    handles = [layers[n].register_forward_hook(hook(n)) for n in need]
    try:
        ctx.calib.run_all(ctx.qmodel)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(p) for n, p in parts.items() if p}


def attach_output_quantizers(ctx: Context, need: dict[str, str | None], method: str,
                             bits: int = 8, max_samples: int = 1 << 18) -> None:
    """Give each listed layer an asymmetric per-tensor ``o_quant`` with a ``method`` range."""
    fn = get_range_method(method)
    samples = _collect_outputs(ctx, need, max_samples)
    layers = quant_layers(ctx.qmodel)
    for name, y in samples.items():
        oq = Quantizer(QuantSpec(bits, symmetric=False))
        oq.set_range(*fn(y.reshape(1, -1), oq.spec))
        layers[name].o_quant = oq
        ctx.report.layer(name).update(o_bits=bits, o_range=method, o_act=need[name])


@dataclass(frozen=True)
class IntOutputsOptions:
    """range: range method for the output quantizers (None: the recipe's activation method)."""

    range: str | None = None
    bits: int = 8
    max_samples: int = 1 << 18

    def __post_init__(self) -> None:
        if self.range is not None:
            get_range_method(self.range)
        QuantSpec(self.bits)


@register_step
class IntOutputs(Step):
    name = "int_outputs"
    Options = IntOutputsOptions

    def run(self, ctx: Context) -> dict[str, Any]:
        t0 = time.perf_counter()
        need = layers_needing_output_quant(ctx.qmodel)
        method = self.options.range or ctx.report.recipe.get("a_range", "mse")
        attach_output_quantizers(ctx, need, method, self.options.bits, self.options.max_samples)
        ctx.report.notes.append(f"int_outputs: {len(need)} conv outputs quantized to "
                                f"{self.options.bits} bits for integer deployment: {sorted(need)}")
        return {"layers": sorted(need), "range": method, "seconds": time.perf_counter() - t0}
