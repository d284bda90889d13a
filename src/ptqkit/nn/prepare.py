"""Model surgery: copy the user's model, fold BatchNorm, swap layers, record execution order."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..core.spec import QuantSpec
from .coverage import Coverage, MacCounter, coverage
from .custom import OpRecord, probe_custom_layers
from .modules import FoldedBN, QuantEmbedding, QuantModule, quant_class_for, quant_layers

__all__ = ["LayerPolicy", "PTQState", "prepare", "weight_symmetry", "set_layer_bits",
           "find_conv_bn_pairs", "set_module",
           "record_layer_order", "apply_bit_policy", "FloatMatmulCounter", "quantize_embeddings"]

log = logging.getLogger(__name__)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_CONV = (nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class LayerPolicy:
    """Which layers are quantized and at which bits (module names matched with fnmatch)."""

    w_bits: int = 8
    a_bits: int = 8
    w_symmetric: bool | None = None  # None: symmetric at 8-bit weights, asymmetric below
    a_symmetric: bool = False
    first_last_8bit: bool = True
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: Mapping[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        QuantSpec(self.w_bits)  # validates the bit widths
        QuantSpec(self.a_bits)
        for name, bits in self.overrides.items():
            if len(bits) != 2:
                raise ValueError(f"override for {name!r} must be (w_bits, a_bits), got {bits!r}")
            QuantSpec(int(bits[0]))
            QuantSpec(int(bits[1]))

    def selects(self, name: str) -> bool:
        inc = any(fnmatch.fnmatchcase(name, p) for p in self.include)
        return inc and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


@dataclass
class PTQState:
    """What prepare() did, attached to the quantized model as ``model.ptq``."""

    layer_order: list[str] = field(default_factory=list)
    folded: dict[str, str] = field(default_factory=dict)  # conv name -> bn name
    bn_unfolded_reason: str | None = None
    stays_float: list[str] = field(default_factory=list)  # leaf modules not quantized
    unfolded: dict[str, str] = field(default_factory=dict)  # bn name -> why it was not folded
    float_reasons: dict[str, str] = field(default_factory=dict)  # conv/linear name -> why float
    macs: dict[str, int] = field(default_factory=dict)  # conv/linear name -> MACs in one batch
    matmul_macs: int = 0  # float activation x activation MACs in the same batch

    def coverage(self, model: nn.Module) -> Coverage:
        """Share of MACs in quantized layers, with the biggest float layers and why."""
        return coverage(model, self.macs, self.matmul_macs, self.float_reasons)


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps every module ptqkit can quantize (subclasses too) as one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return quant_class_for(m)[0] is not None or super().is_leaf_module(m, qualname)


def _bn_problem(bn: nn.Module) -> str | None:
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False): it normalises each batch"
    return None


def find_conv_bn_pairs(model: nn.Module,
                       records: Mapping[str, OpRecord] | None = None,
                       ) -> tuple[dict[str, str], str | None, dict[str, str]]:
    """conv -> bn module-name pairs where BN directly and only consumes the conv output.

    A pair folds only when the conv and the BN each run once per forward, the conv's output
    feeds nothing else, the BN has running statistics, and a custom conv forward (``records``)
    is linear in the conv's own weight. Returns (pairs, reason, unfolded): ``reason`` says why no
    pair could be found when torch.fx cannot trace; ``unfolded`` maps each BN after a conv that
    was left unfolded to why.
    """
    if not any(isinstance(m, _BN) for m in model.modules()):
        return {}, None, {}
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # fx raises many exception types on untraceable code
        msg = f"torch.fx could not trace the model ({type(exc).__name__}: {exc})".split("\n")[0]
        return {}, msg, {}
    mods = dict(model.named_modules())
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            uses[str(node.target)] = uses.get(str(node.target), 0) + 1
    pairs: dict[str, str] = {}
    unfolded: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _BN):
            continue
        src = node.args[0] if node.args else None
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module"
                and isinstance(mods.get(src.target), _CONV)):
            continue
        conv, bn = str(src.target), str(node.target)
        why = _pair_problem(conv, bn, len(src.users), uses, mods[bn], (records or {}).get(conv))
        if why:
            unfolded[bn] = why
        else:
            pairs[conv] = bn
    return pairs, None, unfolded


def _pair_problem(conv: str, bn: str, users: int, uses: Mapping[str, int], bn_mod: nn.Module,
                  record: OpRecord | None) -> str | None:
    if uses.get(conv, 0) > 1:
        return f"{conv} runs {uses[conv]} times per forward (folding would change every use)"
    if uses.get(bn, 0) > 1:
        return f"it runs {uses[bn]} times per forward"
    if users > 1:
        return f"the output of {conv} also feeds other operations"
    if record is not None and not record.foldable:
        return f"the forward of {conv} is not op(x, weight, bias) with its own parameters"
    return _bn_problem(bn_mod)


@torch.no_grad()
def _fold(conv: nn.Module, bn: nn.Module) -> FoldedBN:
    """Fold eval-mode BN into the conv in place: W' = W g/s, b' = (b - mu) g/s + beta."""
    mean, var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
    weight, eps = cast(torch.Tensor, conv.weight), float(cast(float, bn.eps))
    bn_w, bn_b = cast("torch.Tensor | None", bn.weight), cast("torch.Tensor | None", bn.bias)
    conv_b = cast("torch.Tensor | None", conv.bias)
    gamma = bn_w.detach().clone() if bn_w is not None else torch.ones_like(var)
    beta = bn_b.detach().clone() if bn_b is not None else torch.zeros_like(var)
    factor = gamma / torch.sqrt(var + eps)
    weight.mul_(factor.reshape(-1, *([1] * (weight.dim() - 1))))
    bias = conv_b.detach() if conv_b is not None else torch.zeros_like(factor)
    conv.bias = nn.Parameter((bias - mean) * factor + beta)
    return FoldedBN(gamma, beta, eps, mean.clone(), var.clone())


def _fold_all(model: nn.Module, state: PTQState,
              records: Mapping[str, OpRecord]) -> dict[str, FoldedBN]:
    pairs, reason, unfolded = find_conv_bn_pairs(model, records)
    state.bn_unfolded_reason = reason
    state.unfolded = unfolded
    if reason:
        warnings.warn(f"BatchNorm left unfolded: {reason}", stacklevel=3)
    for bn, why in unfolded.items():
        warnings.warn(f"BatchNorm {bn} left unfolded (it stays float): {why}", stacklevel=3)
    folded = {}
    for conv_name, bn_name in pairs.items():
        folded[conv_name] = _fold(model.get_submodule(conv_name), model.get_submodule(bn_name))
        set_module(model, bn_name, nn.Identity())
    state.folded = pairs
    return folded


def _custom_candidates(model: nn.Module) -> list[str]:
    """Modules with their own forward; all are observed, selected or not, since BN folding into
    an excluded one must know its forward too."""
    return [n for n, m in model.named_modules() if n and quant_class_for(m)[1]]


def _swap(model: nn.Module, policy: LayerPolicy, folded: dict[str, FoldedBN],
          records: Mapping[str, OpRecord], state: PTQState) -> None:
    w_spec = QuantSpec(policy.w_bits, weight_symmetry(policy.w_symmetric, policy.w_bits), "channel")
    a_spec = QuantSpec(policy.a_bits, policy.a_symmetric)
    swapped: list[str] = []
    for name, mod in list(model.named_modules()):
        if not name or any(name.startswith(s + ".") for s in swapped):
            continue
        qcls, custom = quant_class_for(mod)
        why = _float_reason(name, mod, qcls, custom, policy, records)
        if why is None and qcls is not None:
            make = cast(Callable[..., QuantModule], qcls)
            q = make(mod, w_spec, a_spec, records[name]) if custom else make(mod, w_spec, a_spec)
            q.folded_bn = folded.get(name)
            q.auto_w_symmetric = policy.w_symmetric is None  # type: ignore[assignment]
            set_module(model, name, q)
            swapped.append(name)
        elif not list(mod.children()) or qcls is not None:
            if next(mod.parameters(recurse=False), None) is not None or qcls is not None:
                state.stays_float.append(f"{name} ({type(mod).__name__})")
                if why:
                    state.float_reasons[name] = why


def _float_reason(name: str, mod: nn.Module, qcls: type[QuantModule] | None, custom: bool,
                  policy: LayerPolicy, records: Mapping[str, OpRecord]) -> str | None:
    """Why a module stays float, or None when it is quantized."""
    if qcls is None:
        if isinstance(mod, (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            return f"{type(mod).__name__} is not supported"
        if isinstance(mod, _CONV + (nn.Linear,)):
            return f"{type(mod).__name__}: unsupported custom forward"
        return None
    if not policy.selects(name):
        return "excluded by the include/exclude patterns"
    if custom:
        rec = records.get(name)
        if rec is None:
            return "its custom forward was not observed"
        problem = rec.problem()
        if problem:
            return f"{type(mod).__name__}: {problem}"
    return None


def _check_dtype(model: nn.Module) -> None:
    for pname, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != torch.float32:
            raise ValueError(f"ptqkit quantizes float32 models, but parameter {pname!r} is "
                             f"{str(p.dtype).replace('torch.', '')}; convert the model with "
                             "model.float() (and the calibration data with .float()) first")


class FloatMatmulCounter(TorchFunctionMode):
    """Counts activation x activation products (attention scores, attention x values) run
    outside any quantized layer: neither operand is a Parameter. These stay float in ptqkit."""

    OPS = {torch.matmul: "matmul", torch.bmm: "bmm", torch.baddbmm: "baddbmm",
           torch.einsum: "einsum", torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul",
           torch.Tensor.bmm: "bmm", F.scaled_dot_product_attention: "scaled_dot_product_attention"}

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        op = self.OPS.get(func)
        if op is not None and not any(isinstance(a, nn.Parameter) for a in args):
            self.counts[op] = self.counts.get(op, 0) + 1
        return func(*args, **(kwargs or {}))

    def describe(self) -> str | None:
        """One line for the report, or None when the model has no such product."""
        if not self.counts:
            return None
        calls = ", ".join(f"{op} x{n}" for op, n in sorted(self.counts.items()))
        return f"activation x activation matmuls, e.g. attention scores ({calls} per forward)"


@torch.no_grad()
def record_layer_order(model: nn.Module, run: Callable[[nn.Module], object]) -> list[str]:
    """Execution order of quantized layers, recorded with forward hooks during ``run(model)``."""
    order: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantModule):
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, n=name: order.append(n) if n not in order else None))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    unused = [n for n, m in model.named_modules() if isinstance(m, QuantModule) and n not in order]
    if unused:
        log.warning("layers never called during calibration (left unquantized): %s", unused)
    return order


def apply_bit_policy(model: nn.Module, policy: LayerPolicy) -> None:
    """Set each layer's bits: base bits, first/last 8-bit, then per-layer overrides (by pattern)."""
    layers = quant_layers(model)
    names = list(layers)
    unknown = [p for p in policy.overrides if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unknown:
        raise ValueError(f"bit overrides name no quantized layer: {unknown}; "
                         f"quantized layers are: {', '.join(names)}")
    for i, (name, layer) in enumerate(layers.items()):
        w, a = policy.w_bits, policy.a_bits
        if policy.first_last_8bit and i in (0, len(names) - 1):
            w, a = max(w, 8), max(a, 8)
        for pattern, bits in policy.overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                w, a = int(bits[0]), int(bits[1])
        set_layer_bits(layer, w, a)


def weight_symmetry(w_symmetric: bool | None, w_bits: int) -> bool:
    """Whether weights at ``w_bits`` are symmetric: as given, or for None (auto) symmetric at
    8 bits and above, where ONNX Runtime's int8 kernels need a zero-point of 0, and asymmetric
    below, where the export stores q - z exactly in int8 with a zero-point of 0 too."""
    return w_bits >= 8 if w_symmetric is None else w_symmetric


def set_layer_bits(layer: QuantModule, w_bits: int, a_bits: int) -> None:
    """Give ``layer`` new weight and input bit widths; its ranges must be set again. A layer
    prepared with automatic weight symmetry (``LayerPolicy.w_symmetric`` None) follows
    :func:`weight_symmetry` at its new bits; otherwise the symmetry stays."""
    spec = layer.w_quant.spec.with_bits(w_bits)
    if getattr(layer, "auto_w_symmetric", False):
        spec = dataclasses.replace(spec, symmetric=weight_symmetry(None, w_bits))
    layer.w_quant.set_spec(spec)
    layer.a_quant.set_spec(layer.a_quant.spec.with_bits(a_bits))


def prepare(model: nn.Module, policy: LayerPolicy,
            run: Callable[[nn.Module], object]) -> nn.Module:
    """Return a quantization-ready copy of ``model`` (the original is never modified).

    ``run(m)`` must execute one forward pass on representative data; it is used to record the
    execution order of the quantized layers (for first/last policy and sequential methods).
    """
    _check_dtype(model)
    qmodel = copy.deepcopy(model).eval()
    for p in qmodel.parameters():
        p.requires_grad_(False)
    state = PTQState()
    custom = _custom_candidates(qmodel)
    records = probe_custom_layers(qmodel, custom, run) if custom else {}
    folded = _fold_all(qmodel, state, records)
    _swap(qmodel, policy, folded, records, state)
    qmodel.ptq = state  # type: ignore[assignment]
    with FloatMatmulCounter() as matmuls, MacCounter(qmodel) as macs:
        state.layer_order = record_layer_order(qmodel, run)
    state.macs, state.matmul_macs = macs.macs, macs.matmul_macs
    if matmuls.describe():
        state.stays_float.append(str(matmuls.describe()))
    if not state.layer_order:
        raise ValueError("no Conv1d/Conv2d/Linear layer was selected and called by the model; "
                         "check the include/exclude patterns")
    unused = [n for n, m in qmodel.named_modules() if isinstance(m, QuantModule)
              and n not in state.layer_order]
    for n in unused:  # never executed: restore nothing, just keep them as float
        layer = cast(QuantModule, qmodel.get_submodule(n))
        layer.w_quant.enabled = False
        layer.a_quant.enabled = False
    apply_bit_policy(qmodel, policy)
    return qmodel


@torch.no_grad()
def quantize_embeddings(model: nn.Module, spec: QuantSpec,
                        include: tuple[str, ...] = ("*",)) -> dict[str, QuantEmbedding]:
    """Swap every ``nn.Embedding`` whose name matches ``include`` for a weight-only QuantEmbedding
    (in place; ranges are left unset). Returns {name: new module}."""
    swapped: dict[str, QuantEmbedding] = {}
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Embedding and any(fnmatch.fnmatchcase(name, p) for p in include):
            swapped[name] = QuantEmbedding(mod, spec)
            set_module(model, name, swapped[name])
    ptq = getattr(model, "ptq", None)
    if isinstance(ptq, PTQState):
        ptq.stays_float = [s for s in ptq.stays_float if s.split(" ")[0] not in swapped]
    return swapped
