"""Step "int_outputs": quantize the tensors ONNX Runtime needs to run the whole network in integers.

ONNX Runtime fuses DQ -> op -> Q into an integer kernel (QLinearConv, QLinearAdd,
QLinearGlobalAveragePool) only when the op's inputs are dequantized integers and its output is
quantized. In the simulated model a tensor is quantized only where it enters a quantized layer
(that layer's input quantizer), so without this step a conv feeding a residual add, the add
itself, the skip branch and the pooling run as float kernels. The step makes the simulated model
quantize (8-bit, per tensor) exactly the tensors the integer graph needs, so that simulated and
deployed model stay the same function:

- conv outputs that do not go (through at most one ReLU/ReLU6) only into quantized layer inputs
  get an output quantizer ``QuantModule.o_quant``;
- residual adds (after a following ReLU/ReLU6 when that is their only consumer) get a shared
  quantizer on the output of the module that returns them (``module.int_out``, applied by a
  forward hook), so that every consumer - the next block's convs and the skip branch of the next
  add, or the pooling - sees the SAME quantized tensor;
- add inputs produced by other float ops (e.g. a max-pooled stem feeding the first skip branch)
  get such a module output quantizer too.

- conv outputs read only by quantized layers (through at most one ReLU/ReLU6 that the grid makes
  redundant) get an output quantizer too (kind "requant"), a copy of their consumers' shared
  input qparams: the simulated function is unchanged (Q is idempotent), and the layer knows the
  grid ONNX Runtime's QLinearConv requantizes to, so that at inference it computes that output
  exactly as the integer kernel does (``ptqkit.nn.integer``);
- residual adds whose two inputs are such quantized outputs get an integer plan: at inference
  (no gradient) the module output hook recomputes the add as MLAS QLinearAdd does from the two
  inputs' codes (:func:`install_integer_plan`, re-installed on the first inference call of a
  loaded model); other module output quantizers round x / s as QuantizeLinear does.

Shared qparams: when a quantized layer with an 8-bit input quantizer consumes the tensor, the new
quantizer copies that layer's scale and zero-point (Q is idempotent with equal qparams, so that
layer's own input quantizer stays exact and the export drops the DQ -> Q pair). Otherwise a fresh
asymmetric quantizer is calibrated on the data (range after the activation: on non-negative data
the zero-point is 0, so Q(relu(y)) = Q(y) and the export drops the ReLU). The step changes the
simulated model (one more rounding per such tensor); the report lists the tensors. Run it as the
last step of a recipe. Tensors that are not the output of a module call (e.g. an add inside a
flat ``forward`` feeding a function), and models torch.fx cannot trace, keep float residuals:
logged, and the export stays exact (ONNX Runtime runs those ops in float).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..core.quantizer import Quantizer
from ..core.spec import QuantSpec
from ..nn import integer
from ..nn.modules import QuantConv1d, QuantConv2d, QuantModule
from ..ranges import get_range_method
from .base import Context, Step, register_step

__all__ = ["IntOutputsOptions", "IntOutputs", "TensorSite", "layers_needing_output_quant",
           "snap_bias", "snap_biases",
           "plan_int_tensors", "attach_output_quantizers", "install_output_quantizer",
           "output_quantizers", "install_integer_plan", "OUT_ATTR"]

log = logging.getLogger(__name__)
OUT_ATTR = "int_out"  # attribute of a module whose output is quantized by a forward hook
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_ACT_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", F.relu6: "relu6", torch.relu_: "relu"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantModule) or super().is_leaf_module(m, qualname)


def _trace(qmodel: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(qmodel)
    except Exception as exc:  # fx raises many exception types on untraceable code
        raise ValueError(f"int_outputs needs a torch.fx-traceable model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0]})") from exc


def _activation(node: fx.Node, mods: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module":
        return _ACT_MODULES.get(type(mods[str(node.target)]))  # type: ignore[arg-type]
    if node.op == "call_function":
        return _ACT_FUNCTIONS.get(node.target)  # type: ignore[arg-type]
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def _is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("add", "add_")))


def _users(node: fx.Node, mods: dict[str, nn.Module]) -> list[fx.Node]:
    """Consumers of ``node``, looking through Identity modules (folded BatchNorms)."""
    out = []
    for u in node.users:
        if u.op == "call_module" and isinstance(mods[str(u.target)], nn.Identity):
            out += _users(u, mods)
        else:
            out.append(u)
    return out


def _quant_input(node: fx.Node, mods: dict[str, nn.Module]) -> QuantModule | None:
    mod = mods.get(str(node.target)) if node.op == "call_module" else None
    return mod if isinstance(mod, QuantModule) and mod.a_quant.active else None


def _feeds_quantized_inputs(nodes: list[fx.Node], mods: dict[str, nn.Module]) -> bool:
    return bool(nodes) and all(_quant_input(n, mods) is not None for n in nodes)


def _through_activation(node: fx.Node, mods: dict[str, nn.Module]) -> tuple[fx.Node, str | None]:
    """(the tensor to quantize, activation) - ``node``'s sole ReLU/ReLU6 consumer if it has one."""
    users = _users(node, mods)
    if len(users) == 1 and (act := _activation(users[0], mods)) is not None:
        return users[0], act
    return node, None


@dataclass
class TensorSite:
    """One tensor the integer graph needs quantized.

    site: module path - a QuantModule (quantizer ``o_quant`` on its output, before ``act``) or a
    module whose output is the tensor (quantizer ``int_out``). consumers: quantized layers
    reading the tensor, in graph order. act: activation between the QuantModule and the tensor.
    """

    node: str
    site: str
    kind: str  # "o_quant", "requant" (read only by quantized layers) or "output"
    act: str | None = None
    consumers: list[str] = field(default_factory=list)
    # residual adds ("output" sites): the add's activation and its two inputs, in argument
    # order, as (module path whose output is the input, "o_quant" or "output", activation)
    add_act: str | None = None
    operands: list[tuple[str, str, str | None]] = field(default_factory=list)


def layers_needing_output_quant(qmodel: nn.Module) -> dict[str, str | None]:
    """{conv layer name: activation applied to its output ('relu', 'relu6' or None)} for every
    quantized conv whose output does not go (through at most one ReLU/ReLU6) only into
    quantized layer inputs. Raises ValueError if torch.fx cannot trace the model."""
    sites, _ = plan_int_tensors(qmodel)
    return {s.site: s.act for s in sites if s.kind == "o_quant"}


def _scope_paths(graph: fx.Graph) -> dict[fx.Node, set[str]]:
    return {n: {str(v[0]) for v in n.meta.get("nn_module_stack", {}).values()} for n in graph.nodes}


def _output_module(t: fx.Node, scopes: dict[fx.Node, set[str]]) -> str | None:
    """Innermost module path whose call returns exactly ``t`` (every use of ``t`` lies outside
    it, and nothing else computed inside it is used outside), or None."""
    stack = [str(v[0]) for v in t.meta.get("nn_module_stack", {}).values()]
    for path in reversed(stack):
        if not path or any(path in scopes[u] for u in t.users):
            continue
        escaping = [n for n, s in scopes.items()
                    if path in s and any(path not in scopes[u] for u in n.users)]
        if escaping == [t]:
            return path
    return None


def _conv_site(node: fx.Node, mods: dict[str, nn.Module]) -> TensorSite | None:
    mod = mods.get(str(node.target)) if node.op == "call_module" else None
    if not isinstance(mod, (QuantConv1d, QuantConv2d)) or not mod.w_quant.active:
        return None
    t, act = _through_activation(node, mods)
    if _feeds_quantized_inputs(_users(t, mods), mods):
        kind = "requant" if mod.a_quant.active else None
        return TensorSite(t.name, str(node.target), kind, act) if kind else None
    return TensorSite(t.name, str(node.target), "o_quant", act)


def _add_operands(add: fx.Node, sites: list[TensorSite],
                  mods: dict[str, nn.Module]) -> list[tuple[str, str, str | None]]:
    """The add's two inputs as (module path, kind, activation) when each is a quantized site's
    tensor (a conv output quantizer or a module output quantizer), else []."""
    args = [a for a in add.args if isinstance(a, fx.Node)]
    if len(args) != 2 or len(add.args) != 2 or add.kwargs:
        return []
    by_node = {s.node: s for s in sites}
    out = []
    for arg in args:
        site = by_node.get(_source(arg, mods).name) or by_node.get(arg.name)
        if site is None:
            return []
        kind = "output" if site.kind == "output" else "o_quant"
        out.append((site.site, kind, site.act if kind == "o_quant" else None))
    return out


def _source(node: fx.Node, mods: dict[str, nn.Module]) -> fx.Node:
    """The producer of ``node``'s value, looking back through Identity modules (folded BNs)."""
    while (node.op == "call_module" and isinstance(mods[str(node.target)], nn.Identity)
           and node.args and isinstance(node.args[0], fx.Node)):
        node = node.args[0]
    return node


def _module_output_site(t: fx.Node, scopes: dict[fx.Node, set[str]],
                        skipped: list[str]) -> TensorSite | None:
    if any(u.op == "output" for u in t.users):
        return None  # the model output stays float
    if (path := _output_module(t, scopes)) is None:
        skipped.append(t.name)
        return None
    return TensorSite(t.name, path, "output")


def plan_int_tensors(qmodel: nn.Module) -> tuple[list[TensorSite], list[str]]:
    """The tensors to quantize for integer deployment, and the residual-add tensors left float.

    Sites: conv outputs not read only by quantized layers (``o_quant``), conv outputs read only
    by quantized layers (``requant``), residual-add outputs (after a sole ReLU/ReLU6; with the
    add's inputs in ``operands``), and add inputs produced by other float ops (e.g. a max-pooled
    stem feeding the first skip branch). Raises ValueError if torch.fx cannot trace the model.
    """
    graph = _trace(qmodel)
    mods = dict(qmodel.named_modules())
    scopes = _scope_paths(graph)
    sites: list[TensorSite] = []
    skipped: list[str] = []
    adds = [n for n in graph.nodes if _is_add(n)]
    for node in graph.nodes:
        if (site := _conv_site(node, mods)) is not None:
            sites.append(site)
        elif node in adds and (site := _module_output_site(
                _through_activation(node, mods)[0], scopes, skipped)) is not None:
            sites.append(site)
    for node in adds:  # add inputs that nothing above quantizes
        for arg in (a for a in node.args if isinstance(a, fx.Node)):
            src = _source(arg, mods)
            known = {s.node for s in sites} | set(skipped)
            if src.op == "call_module" and isinstance(mods[str(src.target)], QuantModule):
                continue  # conv outputs are handled above; other layers' outputs stay as they are
            if src.op != "placeholder" and src.name not in known and (
                    site := _module_output_site(src, scopes, skipped)) is not None:
                sites.append(site)
    for node in adds:
        t, act = _through_activation(node, mods)
        site = next((s for s in sites if s.kind == "output" and s.node == t.name), None)
        if site is not None:
            site.add_act, site.operands = act, _add_operands(node, sites, mods)
    nodes = {n.name: n for n in graph.nodes}
    for s in sites:
        s.consumers = [str(u.target) for u in _users(nodes[s.node], mods)
                       if _quant_input(u, mods) is not None]
    return sites, skipped


_RESHAPES = {torch.flatten, torch.reshape}


def _through_reshapes(node: fx.Node, mods: dict[str, nn.Module]) -> list[fx.Node]:
    """Consumers of ``node`` past flatten / reshape / view / Dropout / Identity (exact at eval)."""
    out = []
    for u in node.users:
        if ((u.op == "call_function" and u.target in _RESHAPES)
                or (u.op == "call_method" and u.target in ("flatten", "reshape", "view"))
                or (u.op == "call_module" and isinstance(mods[str(u.target)], (nn.Identity,
                                                                               nn.Dropout)))):
            out += _through_reshapes(u, mods)
        else:
            out.append(u)
    return out


def plan_pools(qmodel: nn.Module, sites: list[TensorSite]) -> dict[str, tuple[str, str, str | None,
                                                                              str]]:
    """{pooling module: (input module, "o_quant"/"output", activation, consumer layer)} for every
    global average pooling module (AdaptiveAvgPool2d to 1x1) whose input is a quantized site's
    tensor and whose output (through flatten / reshape) only one quantized layer reads: ONNX
    Runtime fuses it into QLinearGlobalAveragePool on that layer's input grid."""
    graph = _trace(qmodel)
    mods = dict(qmodel.named_modules())
    by_node = {s.node: s for s in sites}
    found = {}
    for node in graph.nodes:
        mod = mods.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(mod, nn.AdaptiveAvgPool2d) or mod.output_size not in (1, (1, 1)):
            continue
        arg = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        site = by_node.get(_source(arg, mods).name) or by_node.get(arg.name) if arg else None
        users = _through_reshapes(node, mods)
        if site is None or len(users) != 1 or _quant_input(users[0], mods) is None:
            continue
        kind = "output" if site.kind == "output" else "o_quant"
        found[str(node.target)] = (site.site, kind, site.act if kind == "o_quant" else None,
                                   str(users[0].target))
    return found


_PLAN_ATTR = "_int_add"  # a residual add's integer plan (_AddPlan), on the module returning it
_LAST_ATTR = "_int_last"  # the last inference output of a module whose output an add reads
_PLANNED_ATTR = "_int_planned"  # on the root: install_integer_plan has run


@dataclass
class _AddPlan:
    """The two inputs of a residual add (argument order): (module, "o_quant"/"output", act)."""

    operands: list[tuple[nn.Module, str, str | None]]
    act: str | None


def _capture_hook(module: nn.Module, args: Any, out: Any) -> None:
    """Forward hook: keep the module's last inference output (a residual add reads it)."""
    if isinstance(out, torch.Tensor) and not torch.is_grad_enabled():
        setattr(module, _LAST_ATTR, out)


def _grid_8bit(q: Any) -> bool:
    return (isinstance(q, Quantizer) and q.active and q.spec.bits == 8 and not q.spec.per_channel
            and q.channel_bits is None)


_F32_EPS = float(torch.finfo(torch.float32).eps)


def _act_redundant(act: str | None, q: Quantizer) -> bool:
    """True when ONNX Runtime drops ``act`` in front of a QuantizeLinear on ``q``'s grid
    (ClipQuantFusion, clip_quantizelinear.cc: lower = fl32(s (qmin - z)), upper = fl32(s (qmax -
    z)), dropped when 0 - lower <= eps and upper - 6 <= eps in float32). Then Q(act(y)) = Q(y)
    (the grid's top code is the nearest to 6), so simulated and deployed model agree."""
    if act is None:
        return True
    s, z = q.qparams()
    s32 = s.float().reshape(())
    lower = float(s32 * torch.tensor(float(q.spec.qmin - int(z)), dtype=torch.float32))
    upper = float(s32 * torch.tensor(float(q.spec.qmax - int(z)), dtype=torch.float32))
    if 0.0 - lower > _F32_EPS:
        return False
    return act == "relu" or float(torch.tensor(upper - 6.0, dtype=torch.float32)) <= _F32_EPS


def _operand_quantizer(mod: nn.Module, kind: str) -> Any:
    return getattr(mod, "o_quant", None) if kind == "o_quant" else getattr(mod, OUT_ATTR, None)


def _integer_add(module: nn.Module, out: torch.Tensor, qc: Quantizer) -> torch.Tensor | None:
    """The add's output as MLAS QLinearAdd computes it from its inputs' codes, dequantized; None
    when the module has no plan, its inputs were not both seen, or ONNX Runtime would not fuse
    the add (an activation the grid does not make redundant, mixed grids)."""
    plan = getattr(module, _PLAN_ATTR, None)
    if plan is None or not _grid_8bit(qc) or not _act_redundant(plan.act, qc):
        return None
    vals = []
    for mod, kind, act in plan.operands:
        t, q = getattr(mod, _LAST_ATTR, None), _operand_quantizer(mod, kind)
        if (t is None or t.shape != out.shape or t.dtype != out.dtype or not _grid_8bit(q)
                or q.spec.symmetric != qc.spec.symmetric or not _act_redundant(act, q)):
            return None
        vals.append((_after(act, t), q))
    (a, qa), (b, qb) = vals
    if not torch.equal(_after(plan.act, a + b), out):
        return None  # the kept outputs are not this add's inputs (e.g. a module called twice)
    (sa, za), (sb, zb), (sc, zc) = qa.qparams(), qb.qparams(), qc.qparams()
    lo, hi = qc.spec.qmin, qc.spec.qmax
    ca = integer.quantize_codes(a, sa, za, qa.spec.qmin, qa.spec.qmax)
    cb = integer.quantize_codes(b, sb, zb, qb.spec.qmin, qb.spec.qmax)
    c = integer.qlinear_add(ca, float(sa), int(za), cb, float(sb), int(zb), float(sc), int(zc),
                            lo, hi)
    return (c - zc.reshape(())) * sc.reshape(())


def _output_quant_hook(module: nn.Module, args: Any, out: Any) -> Any:
    """Forward hook: quantize the module's output with its ``int_out`` quantizer.

    At inference (no gradient): a planned residual add is recomputed as QLinearAdd does
    (:func:`_integer_add`); otherwise an 8-bit per-tensor grid rounds x / s (QuantizeLinear)."""
    q = getattr(module, OUT_ATTR, None)
    if q is None or not isinstance(out, torch.Tensor):
        return out
    if not torch.is_grad_enabled() and integer.integer_inference() and _grid_8bit(q):
        y = _integer_add(module, out, q)
        if y is not None:
            return y
        s, z = q.qparams()
        codes = integer.quantize_codes(out, s, z, q.spec.qmin, q.spec.qmax)
        return (codes - z.reshape(())) * s.reshape(())
    return q(out)


def _lazy_plan_hook(model: nn.Module, args: Any) -> None:
    """Forward pre-hook of the root: install the integer plan at the first inference call (a
    model loaded from a file has its quantizers but not the plan)."""
    if not torch.is_grad_enabled() and not getattr(model, _PLANNED_ATTR, False):
        install_integer_plan(model)


def install_output_quantizer(model: nn.Module, path: str, quantizer: nn.Module) -> None:
    """Quantize the output of ``model.get_submodule(path)`` with ``quantizer`` (kept as the
    module's ``int_out`` attribute, so it is in the state_dict and survives deepcopy)."""
    mod = model.get_submodule(path)
    setattr(mod, OUT_ATTR, quantizer)
    if _output_quant_hook not in mod._forward_hooks.values():
        mod.register_forward_hook(_output_quant_hook)
    if path and _lazy_plan_hook not in model._forward_pre_hooks.values():
        setattr(model, _PLANNED_ATTR, False)
        model.register_forward_pre_hook(_lazy_plan_hook)


_POOL_ATTR = "_int_pool"  # a global average pooling's integer plan (_PoolPlan)


@dataclass
class _PoolPlan:
    """Input (module, "o_quant"/"output", activation) and the layer reading the pooled tensor."""

    source: tuple[nn.Module, str, str | None]
    consumer: QuantModule


def _pool_hook(module: nn.Module, args: Any, out: Any) -> Any:
    """Forward hook of a planned global average pooling: at inference, the output as MLAS
    QLinearGlobalAveragePool computes it on the consumer's input grid (x86 path: int32 sum of
    the codes minus z_in * HW, requantized with fl32(s_in / fl32(s_out * HW))), dequantized."""
    plan = getattr(module, _POOL_ATTR, None)
    if (plan is None or not isinstance(out, torch.Tensor) or torch.is_grad_enabled()
            or not integer.integer_inference() or not args or not isinstance(args[0], torch.Tensor)):
        return out
    x = args[0]
    src, kind, act = plan.source
    qi, qo = _operand_quantizer(src, kind), plan.consumer.a_quant
    if (x.dim() != 4 or not _grid_8bit(qi) or not _grid_8bit(qo) or not _act_redundant(act, qi)
            or qi.spec.symmetric != qo.spec.symmetric):
        return out
    s_in, z_in = qi.qparams()
    codes = integer.quantize_codes(x, s_in, z_in, qi.spec.qmin, qi.spec.qmax)
    if not torch.equal((codes - z_in.reshape(())) * s_in.reshape(()), x):
        return out  # the input is not on the grid: ONNX Runtime would not see these codes
    hw = x.shape[2] * x.shape[3]
    acc = codes.double().sum((2, 3), keepdim=True) - float(z_in) * hw
    s_out, z_out = qo.qparams()
    m = s_in.float().reshape(()) / (s_out.float().reshape(()) * torch.tensor(float(hw)))
    y_c = integer.requantize(acc, m, z_out, qo.spec.qmin, qo.spec.qmax)
    return (y_c * s_out.reshape(())).reshape(out.shape)


def install_integer_plan(model: nn.Module) -> int:
    """Give every residual add whose inputs are both quantized tensors its integer plan (the
    modules whose outputs are its inputs keep their last inference output for it), and every
    global average pooling ONNX Runtime runs as QLinearGlobalAveragePool its own. Returns how
    many ops have a plan; 0 (float ops) when torch.fx cannot trace the model."""
    setattr(model, _PLANNED_ATTR, True)
    try:
        sites, _ = plan_int_tensors(model)
    except ValueError:
        return 0
    planned = 0
    for site in sites:
        mod = model.get_submodule(site.site)
        if site.kind != "output" or len(site.operands) != 2 or getattr(mod, OUT_ATTR, None) is None:
            continue
        operands = [(model.get_submodule(path), kind, act) for path, kind, act in site.operands]
        for op_mod, _, _ in operands:
            if _capture_hook not in op_mod._forward_hooks.values():
                op_mod.register_forward_hook(_capture_hook)
        setattr(mod, _PLAN_ATTR, _AddPlan(operands, site.add_act))
        planned += 1
    for path, (src, kind, act, consumer) in plan_pools(model, sites).items():
        mod = model.get_submodule(path)
        setattr(mod, _POOL_ATTR, _PoolPlan((model.get_submodule(src), kind, act),
                                           cast(QuantModule, model.get_submodule(consumer))))
        if _pool_hook not in mod._forward_hooks.values():
            mod.register_forward_hook(_pool_hook)
        planned += 1
    return planned


def output_quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """{module path: quantizer} of every module output quantized by :func:`install_output_quantizer`."""
    return {n: getattr(m, OUT_ATTR) for n, m in model.named_modules()
            if isinstance(getattr(m, OUT_ATTR, None), Quantizer)}


def _after(act: str | None, y: torch.Tensor) -> torch.Tensor:
    if act == "relu":
        return torch.relu(y)
    return torch.clamp(y, 0.0, 6.0) if act == "relu6" else y


@torch.no_grad()
def _collect(ctx: Context, sites: list[TensorSite], max_samples: int) -> dict[str, torch.Tensor]:
    """A random subsample (plus exact min and max) of every site's (activated) output tensor."""
    g = torch.Generator().manual_seed(ctx.seed)
    per_batch = max(1, max_samples // max(1, len(ctx.calib)))
    parts: dict[str, list[torch.Tensor]] = {s.node: [] for s in sites}

    def hook(site: TensorSite):  # type: ignore[no-untyped-def]
        def fn(mod: nn.Module, args: Any, out: torch.Tensor) -> None:
            y = _after(site.act, out.detach()).reshape(-1).float()
            idx = torch.randint(0, y.numel(), (min(per_batch, y.numel()),), generator=g)
            parts[site.node] += [y[idx], y.min().reshape(1), y.max().reshape(1)]
        return fn

    handles = [ctx.qmodel.get_submodule(s.site).register_forward_hook(hook(s)) for s in sites]
    try:
        ctx.calib.run_all(ctx.qmodel)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(p) for n, p in parts.items() if p}


def _a_quant(ctx: Context, name: str) -> Quantizer:
    return cast(QuantModule, ctx.qmodel.get_submodule(name)).a_quant  # consumers are QuantModules


def _shared_source(ctx: Context, site: TensorSite, bits: int) -> tuple[str, Quantizer] | None:
    """(name, input quantizer) of the first consumer with a ``bits``-bit grid, or None."""
    for name in site.consumers:
        aq = _a_quant(ctx, name)
        if aq.active and aq.spec.bits == bits:
            return name, aq
    return None


@torch.no_grad()
def _unify_consumers(ctx: Context, site: TensorSite, q: Quantizer) -> None:
    """Give every other consumer with the same grid the shared qparams (they read the same tensor,
    so each was calibrated on the same data): their input quantizers become exact no-ops."""
    for name in site.consumers:
        aq = _a_quant(ctx, name)
        if aq.active and aq.spec == q.spec:
            aq.set_qparams(*q.qparams())


def _install(ctx: Context, site: TensorSite, q: Quantizer) -> None:
    if site.kind in ("o_quant", "requant"):
        ctx.qmodel.get_submodule(site.site).o_quant = q
    else:
        install_output_quantizer(ctx.qmodel, site.site, q)


def _requant_ok(ctx: Context, site: TensorSite, q: Quantizer) -> bool:
    """A "requant" site is ONNX Runtime's QLinearConv output grid when every consumer reads the
    tensor on the same 8-bit grid (one QuantizeLinear after the merge) and the activation in
    between is redundant on it (the export drops it)."""
    if not site.consumers or not _act_redundant(site.act, q):
        return False
    want = [t.tolist() for t in q.qparams()]
    for name in site.consumers:
        aq = _a_quant(ctx, name)
        if not _grid_8bit(aq) or aq.spec != q.spec or [t.tolist() for t in aq.qparams()] != want:
            return False
    return True


def attach_output_quantizers(ctx: Context, sites: list[TensorSite], method: str, bits: int = 8,
                             max_samples: int = 1 << 18) -> dict[str, str]:
    """Give every site an asymmetric per-tensor ``bits``-bit quantizer: a copy of its first
    consumer's input qparams when that consumer has a ``bits``-bit grid, else calibrated with
    ``method`` on the site's data. "requant" sites get the copy only when all their consumers
    share one 8-bit grid that makes the activation redundant (else nothing). Returns
    {tensor: 'shared:<layer>' or 'calibrated'}."""
    sources = {s.node: _shared_source(ctx, s, bits) for s in sites}
    fresh = [s for s in sites if sources[s.node] is None and s.kind != "requant"]
    samples = _collect(ctx, fresh, max_samples) if fresh else {}
    fn, how = get_range_method(method), {}
    for site in sites:
        src = sources[site.node]
        if site.kind == "requant":
            if src is None or not _grid_8bit(src[1]):
                continue
            q = Quantizer(src[1].spec)
            q.set_qparams(*src[1].qparams())
            _unify_consumers(ctx, site, q)
            if not _requant_ok(ctx, site, q):
                continue
            how[site.node] = "shared:" + src[0]
        elif src is not None:
            q = Quantizer(src[1].spec)
            q.set_qparams(*src[1].qparams())
            how[site.node] = "shared:" + src[0]
            _unify_consumers(ctx, site, q)
        elif site.node in samples:
            q = Quantizer(QuantSpec(bits, symmetric=False))
            q.set_range(*fn(samples[site.node].reshape(1, -1), q.spec))
            how[site.node] = "calibrated"
        else:
            continue  # the site never ran on the calibration data
        _install(ctx, site, q)
        if site.kind == "o_quant":
            ctx.report.layer(site.site).update(o_bits=q.spec.bits, o_range=how[site.node],
                                               o_act=site.act)
    return how


def snap_bias(bias: torch.Tensor, s_x: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """The bias on the int32 grid the integer kernels add it on: round(b / (s_x s_w)) * s_x s_w.

    bias, s_w: (C,); s_x: per-tensor input scale. The product s_x * s_w is formed in float32 as
    the export does, so the export's rounding gives back the same integers exactly.
    """
    scale = (s_x.float().reshape(()) * s_w.float()).reshape(-1)
    k = torch.round(bias.double() / scale.double())
    return (k * scale.double()).float()


@torch.no_grad()
def snap_biases(qmodel: nn.Module) -> float:
    """Snap the bias of every layer with active input and weight quantizers to its int32 grid
    (ONNX Runtime's QLinearConv / QGemm add the bias as int32): the simulated model then adds
    exactly what the integer kernel adds. Returns the largest change (absolute)."""
    change = 0.0
    for layer in (m for m in qmodel.modules() if isinstance(m, QuantModule)):
        if layer.bias is None or not (layer.a_quant.active and layer.w_quant.active):
            continue
        new = snap_bias(layer.bias, layer.a_quant.qparams()[0], layer.w_quant.qparams()[0])
        change = max(change, float((new - layer.bias).abs().max()))
        layer.bias.copy_(new.reshape(layer.bias.shape))
    return change


@dataclass(frozen=True)
class IntOutputsOptions:
    """range: range method for freshly calibrated quantizers (None: the recipe's activation
    method). bits: their bit width (and the input grid whose qparams are shared). snap_bias: put
    biases on the int32 grid of the integer kernels (s_x * s_w), so simulated == deployed."""

    range: str | None = None
    bits: int = 8
    max_samples: int = 1 << 18
    snap_bias: bool = True

    def __post_init__(self) -> None:
        if self.range is not None:
            get_range_method(self.range)
        QuantSpec(self.bits)


@register_step
class IntOutputs(Step):
    name = "int_outputs"
    Options = IntOutputsOptions

    def run(self, ctx: Context) -> dict[str, Any]:
        try:
            sites, skipped = plan_int_tensors(ctx.qmodel)
        except ValueError as exc:
            log.warning("int_outputs: %s; residual adds and conv outputs stay float", exc)
            ctx.report.notes.append(f"int_outputs skipped: {exc}")
            sites, skipped = [], []
        method = self.options.range or (ctx.recipe.a_range if ctx.recipe else "mse")
        how = attach_output_quantizers(ctx, sites, method, self.options.bits,
                                       self.options.max_samples)
        if self.options.snap_bias:  # after attaching: that may unify consumers' input scales
            ctx.report.notes.append("int_outputs: biases snapped to their int32 grid (largest "
                                    f"change {snap_biases(ctx.qmodel):.2e})")
        convs = sorted(s.site for s in sites if s.kind == "o_quant")
        outs = {s.site: how.get(s.node) for s in sites if s.kind == "output"}
        requant = sorted(s.site for s in sites if s.kind == "requant" and s.node in how)
        planned = install_integer_plan(ctx.qmodel)
        ctx.report.notes.append(f"int_outputs: {len(convs)} conv outputs and {len(outs)} module "
                                f"outputs (residual adds) quantized to {self.options.bits} bits "
                                f"for integer deployment: {convs}, {sorted(outs)}")
        ctx.report.notes.append(f"int_outputs: {len(requant)} conv outputs read only by quantized "
                                f"layers carry their consumers' grid and {planned} residual adds "
                                "an integer plan: at inference they compute what ONNX Runtime's "
                                "QLinearConv / QLinearAdd compute")
        if skipped:
            msg = (f"int_outputs: {len(skipped)} residual adds are not the output of a module call "
                   f"and stay float (ONNX Runtime runs them in float): {skipped}")
            log.info(msg)
            ctx.report.notes.append(msg)
        return {"layers": convs, "tensors": outs, "skipped": skipped, "range": method,
                "requant": requant, "integer_adds": planned}
