"""ONNX export in QDQ form for ONNX Runtime's integer kernels.

Every quantizer of the simulated model becomes a QuantizeLinear/DequantizeLinear (QDQ) pair with
the same scale and zero-point, at the same place:

- layer input (``a_quant``, per tensor): uint8 (asymmetric) or int8 (symmetric) QDQ. A b-bit grid
  with b < 8 is carried in the 8-bit container and clipped to its b-bit range by a ``Clip`` in
  front of the QuantizeLinear (ONNX Runtime 1.32 does not fuse INT4/UINT4 QDQ into integer
  kernels: such a Conv runs in float, so the 8-bit container is used).
- weights (``w_quant``, per output channel, axis 0): an integer initializer followed by a
  DequantizeLinear - int8 with zero-point 0 for symmetric weights, uint8 with the per-channel
  zero-points for asymmetric weights (both exact: DQ gives the simulated weight bit for bit).
- bias: int32 with scale s_x * s_w[c] and zero-point 0 (what ONNX Runtime's fused kernels read),
  rounded half to even; the rounding error is at most s_x * s_w[c] / 2 per output.

- module outputs quantized by the int_outputs step (``module.int_out``, e.g. residual adds):
  per-tensor QDQ at the module's output.

BatchNorm is already folded into the quantized layers by :func:`ptqkit.nn.prepare.prepare`.
The graph is then cleaned for ONNX Runtime's QDQ fusions, every rewrite exact
(:func:`simplify_qdq`): Relu/Clip in front of a Q whose grid they cannot change are dropped,
duplicate Qs of one tensor merged, DQ -> Q pairs with equal scale and zero-point skipped (shared
quantizers), and a per-tensor Q after Flatten/Reshape moved in front of it. An op whose inputs
come from DQ nodes and whose output goes into one Q is fused by ONNX Runtime into an integer
kernel (QLinearConv, QGemm, QLinearAdd, QLinearGlobalAveragePool); ops left in float in the
simulated model (e.g. an add the int_outputs step could not quantize) run as float kernels on
exactly dequantized integers.

:func:`export_onnx` names, in ``ExportInfo.notes`` and a log warning, the layers ONNX Runtime
cannot run on its fast integer kernels and what to change: asymmetric 8-bit weights (uint8,
slow path: use symmetric weights), layers left in float after ONNX Runtime's fusions (output not
quantized: run int_outputs), and on x86 CPUs without VNNI int8 weights beyond +-64 (the U8S8
kernels' saturating int16 pair sums: use 7-bit symmetric weights).
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..algorithms.int_outputs import OUT_ATTR, output_quantizers
from ..nn.modules import QuantModule, quant_layers
from ..nn.prepare import set_module

__all__ = ["ExportInfo", "export_onnx", "weight_container", "ort_load", "optimized_op_counts",
           "QDQLayer", "QDQTensor", "simplify_qdq", "cpu_info", "VNNI_FLAGS"]

log = logging.getLogger(__name__)
INT32_MAX = 2**31 - 1


@dataclass
class ExportInfo:
    """What :func:`export_onnx` wrote: per-layer containers and notes for the report."""

    path: Path
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    float_layers: list[str] | None = None  # quantized layers ONNX Runtime runs in float; None: unknown


@dataclass(frozen=True)
class _TensorQDQ:
    """Per-tensor QDQ of an active quantizer: clip to the b-bit grid, then 8-bit QDQ."""

    scale: float
    zp: int
    lim: tuple[int, int]
    clip: tuple[float, float] | None

    @staticmethod
    def of(q: Any) -> _TensorQDQ | None:
        if q is None or not q.active:
            return None
        s, z = q.qparams()
        spec = q.spec
        scale, zp = float(s.item()), int(z.item())
        lim = (-128, 127) if spec.symmetric else (0, 255)
        clip = None if spec.bits == 8 else ((spec.qmin - zp) * scale, (spec.qmax - zp) * scale)
        return _TensorQDQ(scale, zp, lim, clip)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip is not None:
            x = torch.clamp(x, self.clip[0], self.clip[1])
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zp, *self.lim)


class QDQTensor(nn.Module):
    """Export-time stand-in for a per-tensor :class:`Quantizer` on a module output (int_out)."""

    def __init__(self, quantizer: Any) -> None:
        super().__init__()
        self.qdq = _TensorQDQ.of(quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.qdq is None else self.qdq(x)


class QDQLayer(nn.Module):
    """Export-time stand-in for a QuantModule: traces to Clip/QDQ(input), QDQ(weight), float op.

    Numerically it computes what the QuantModule computes (same integer codes); the structure
    is chosen so that torch.onnx emits QuantizeLinear/DequantizeLinear nodes.
    """

    w_dq: torch.Tensor
    w_scale: torch.Tensor
    w_zp: torch.Tensor

    def __init__(self, layer: QuantModule) -> None:
        super().__init__()
        self.layer = layer
        self.act = _TensorQDQ.of(layer.a_quant)
        self.out = _TensorQDQ.of(layer.o_quant)
        self.wq = layer.w_quant.active
        with torch.no_grad():
            w = layer.w_quant(layer.weight) if self.wq else layer.weight
        self.register_buffer("w_dq", w.detach().clone())
        if self.wq:
            s, z = layer.w_quant.qparams()
            self.register_buffer("w_scale", s.clone())
            shifted = weight_container(layer) == "int8"  # symmetric, or asymmetric q - z in int8
            self.register_buffer("w_zp", torch.zeros_like(z, dtype=torch.int32) if shifted
                                 else z.to(torch.int32))
            self.w_lim = (-128, 127) if shifted else (0, 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        w = self.w_dq
        if self.wq:
            w = torch.fake_quantize_per_channel_affine(w, self.w_scale, self.w_zp, 0, *self.w_lim)
        y = self.layer.op(x, w, self.layer.bias)
        return y if self.out is None else self.out(y)


def weight_container(layer: QuantModule) -> str:
    """int8 (zero-point 0) for symmetric weights and for asymmetric weights of <= 7 bits, stored
    as q - z (in [-(2^b - 1), 2^b - 1], exact); uint8 with per-channel zero-points for asymmetric
    8-bit weights (exact, but ONNX Runtime runs that case on a slower U8U8 path)."""
    spec = layer.w_quant.spec
    return "int8" if spec.symmetric or spec.bits <= 7 else "uint8"


def _max_int8_weight(layer: QuantModule) -> int | None:
    """Largest |code| of the int8 weight initializer (q, or q - z for asymmetric weights)."""
    if not layer.w_quant.active or weight_container(layer) != "int8":
        return None
    with torch.no_grad():
        q = layer.w_quant.int_repr(layer.weight)
        z = layer.w_quant.qparams()[1].to(torch.int32).reshape(-1, *[1] * (q.dim() - 1))
        return int((q - z).abs().max())


def _layer_info(name: str, layer: QuantModule) -> dict[str, Any]:
    a, w = layer.a_quant, layer.w_quant
    a_type = ("int8" if a.spec.symmetric else "uint8") if a.active else "float"
    w_type = weight_container(layer) if w.active else "float"
    return {"w_bits": w.spec.bits if w.active else 32, "a_bits": a.spec.bits if a.active else 32,
            "w_type": w_type, "a_type": a_type, "w_max_abs": _max_int8_weight(layer),
            "w_zero_point": "per-channel" if w_type == "uint8" else "0",
            "a_container": "8-bit, clipped" if a.active and a.spec.bits < 8 else a_type,
            "o_quant": layer.o_quant.spec.bits if layer.o_quant is not None and layer.o_quant.active
            else None}


def deploy_copy(qmodel: nn.Module) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A copy of ``qmodel`` with every QuantModule replaced by a :class:`QDQLayer`."""
    model = copy.deepcopy(qmodel).eval()
    layers = quant_layers(model)
    info = {}
    for name, layer in layers.items():
        if layer.w_quant.active and layer.w_quant.spec.bits > 8:
            raise ValueError(f"layer {name}: {layer.w_quant.spec.bits}-bit weights cannot be "
                             "exported as 8-bit integers; use bits <= 8 or disable the quantizer")
        info[name] = _layer_info(name, layer)
        set_module(model, name, QDQLayer(layer))
    for path, quantizer in output_quantizers(model).items():
        setattr(model.get_submodule(path), OUT_ATTR, QDQTensor(quantizer))
    return model, info


class _Graph:
    """Name lookups over an onnx.GraphProto (initializers and Constant nodes as constants)."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model, self.g, self.nh = model, model.graph, numpy_helper
        self.inits = {t.name: t for t in self.g.initializer}
        self.producer = {o: n for n in self.g.node for o in n.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return self.nh.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return self.nh.to_array(node.attribute[0].t)
        if node is not None and node.op_type == "Identity":  # torch.onnx de-duplicates constants
            return self.const(node.input[0])
        return None

    def add_init(self, array: np.ndarray, name: str) -> str:
        tensor = self.nh.from_array(array, name)
        self.g.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def consumers(self, name: str) -> list[Any]:
        return [n for n in self.g.node if name in n.input]


def _axis(node: Any) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _quantize_np(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zp) in zp's dtype."""
    shape = [1] * x.ndim
    if scale.ndim == 1:
        shape[axis] = -1
    s, z = scale.reshape(shape).astype(np.float32), zp.reshape(shape).astype(np.int64)
    info = np.iinfo(zp.dtype)
    return np.clip(np.rint(x / s) + z, info.min, info.max).astype(zp.dtype)


def _fold_weight_quantizers(gr: _Graph) -> int:
    """Replace QuantizeLinear(constant) by the integer initializer it computes."""
    folded = 0
    for node in list(gr.g.node):
        if node.op_type != "QuantizeLinear":
            continue
        x, scale, zp = (gr.const(n) for n in node.input[:3])
        if x is None or scale is None or zp is None:
            continue
        q = _quantize_np(x, scale, zp, _axis(node))
        name = gr.add_init(q, node.output[0] + "_int")
        for c in gr.consumers(node.output[0]):
            c.input[:] = [name if i == node.output[0] else i for i in c.input]
        gr.g.node.remove(node)
        folded += 1
    return folded


def _dq_scale(gr: _Graph, tensor: str) -> np.ndarray | None:
    node = gr.producer.get(tensor)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    return gr.const(node.input[1])


def _quantize_biases(gr: _Graph) -> list[str]:
    """Float bias of a QDQ Conv/Gemm -> int32 initializer + DequantizeLinear(scale s_x * s_w)."""
    notes = []
    for node in list(gr.g.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        s_x, s_w, bias = _dq_scale(gr, node.input[0]), _dq_scale(gr, node.input[1]), None
        if s_x is None or s_w is None or (bias := gr.const(node.input[2])) is None:
            continue
        scale = (np.float32(s_x) * s_w.astype(np.float32)).reshape(-1)
        scale = np.broadcast_to(scale, bias.shape).astype(np.float32).copy()
        q = np.rint(bias.astype(np.float64) / scale)
        if np.abs(q).max() > INT32_MAX:
            notes.append(f"{node.name}: bias saturated to int32 (bias / (s_x*s_w) too large)")
        q = np.clip(q, -INT32_MAX - 1, INT32_MAX).astype(np.int32)
        base = node.input[2]
        q_name = gr.add_init(q, base + "_int32")
        s_name = gr.add_init(scale, base + "_scale")
        from onnx import helper

        dq = helper.make_node("DequantizeLinear", [q_name, s_name], [base + "_dq"], axis=0,
                              name=(node.name or base) + "_bias_dq")
        gr.g.node.insert(list(gr.g.node).index(node), dq)
        node.input[2] = base + "_dq"
    return notes


def _dq_range(gr: _Graph, tensor: str) -> tuple[float, float] | None:
    """[lo, hi] a per-tensor DequantizeLinear output can take, or None."""
    node = gr.producer.get(tensor)
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return None
    scale, zp = gr.const(node.input[1]), gr.const(node.input[2])
    if scale is None or zp is None or scale.size != 1:
        return None
    info, z, s = np.iinfo(zp.dtype), int(zp.reshape(-1)[0]), np.float32(scale.reshape(-1)[0])
    # the values DequantizeLinear really outputs: (q - z) * s in float32, as ONNX Runtime and
    # the simulated model compute them (in float64, 255 * (6 / 255) would exceed 6)
    return float(np.float32(info.min - z) * s), float(np.float32(info.max - z) * s)


def _drop_noop_activations(gr: _Graph) -> int:
    """Bypass Relu / Clip(0, 6) whose input is a DequantizeLinear already inside their range
    (an output quantizer calibrated after the activation): exact, saves a float pass."""
    dropped = 0
    for node in list(gr.g.node):
        rng = _dq_range(gr, node.input[0]) if node.op_type in ("Relu", "Clip") else None
        if rng is None:
            continue
        lo_hi = (0.0, np.inf) if node.op_type == "Relu" else tuple(
            float(v) if (v := gr.const(i)) is not None else np.nan for i in node.input[1:3])
        if len(lo_hi) != 2 or not (lo_hi[0] <= rng[0] and rng[1] <= lo_hi[1]):
            continue
        if node.output[0] in {o.name for o in gr.g.output}:
            continue
        for c in gr.consumers(node.output[0]):
            c.input[:] = [node.input[0] if i == node.output[0] else i for i in c.input]
        gr.g.node.remove(node)
        dropped += 1
    return dropped


def _qparams_key(gr: _Graph, node: Any) -> tuple[Any, ...] | None:
    """Hashable (scale, zero-point, dtype, axis) of a Q/DQ node with constant qparams, or None."""
    if len(node.input) < 3:
        return None
    scale, zp = gr.const(node.input[1]), gr.const(node.input[2])
    if scale is None or zp is None:
        return None
    axis = _axis(node) if scale.size > 1 else None
    return scale.astype(np.float32).tobytes(), zp.tobytes(), str(zp.dtype), scale.shape, axis


def _rewire(gr: _Graph, old: str, new: str) -> bool:
    """Point every consumer of tensor ``old`` at ``new``; False if ``old`` is a graph output."""
    if old in {o.name for o in gr.g.output}:
        return False
    for c in gr.consumers(old):
        c.input[:] = [new if i == old else i for i in c.input]
    return True


def _skip_requantize(gr: _Graph) -> int:
    """Q(DQ(x)) with the DQ's own scale and zero-point is x: read x directly (exact)."""
    skipped = 0
    for node in list(gr.g.node):
        prev = gr.producer.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if prev is None or prev.op_type != "DequantizeLinear":
            continue
        key = _qparams_key(gr, node)
        if key is not None and key == _qparams_key(gr, prev) and _rewire(gr, node.output[0], prev.input[0]):
            skipped += 1
    return skipped


def _merge_duplicate_quantizers(gr: _Graph) -> int:
    """Several QuantizeLinear of one tensor with equal qparams (one per consumer layer) -> one."""
    seen: dict[tuple[Any, ...], str] = {}
    merged = 0
    for node in list(gr.g.node):
        key = _qparams_key(gr, node) if node.op_type == "QuantizeLinear" else None
        if key is None:
            continue
        first = seen.setdefault((node.input[0], *key), node.output[0])
        if first != node.output[0] and _rewire(gr, node.output[0], first):
            merged += 1
    return merged


def _q_range(gr: _Graph, node: Any, margin: float = 0.0) -> tuple[float, float] | None:
    """[lo, hi] a per-tensor QuantizeLinear can represent, or None; ``margin`` (in steps) moves
    both ends inwards: every x <= lo (>= hi) still maps to the lowest (highest) code."""
    scale, zp = gr.const(node.input[1]), gr.const(node.input[2]) if len(node.input) > 2 else None
    if scale is None or zp is None or scale.size != 1:
        return None
    info, z, s = np.iinfo(zp.dtype), int(zp.reshape(-1)[0]), float(scale.reshape(-1)[0])
    return s * (info.min - z + margin), s * (info.max - z - margin)


def _clip_bounds(gr: _Graph, node: Any) -> tuple[float, float] | None:
    if node.op_type == "Relu":
        return 0.0, np.inf
    if node.op_type != "Clip":
        return None
    vals = [gr.const(i) if i else None for i in list(node.input[1:3]) + [""] * (3 - len(node.input))]
    lo = float(vals[0]) if vals[0] is not None else -np.inf
    hi = float(vals[1]) if vals[1] is not None else np.inf
    return lo, hi


def _drop_activations_before_q(gr: _Graph) -> int:
    """Relu/Clip -> QuantizeLinear whose grid lies inside the activation's range (e.g. uint8
    with zero-point 0 after a Relu, or a Clip(0, 6) before a grid of step 6/255): Q(act(x)) =
    Q(x), so the Q reads x (exact: a bound within a quarter step inside the end codes still
    rounds to them, which also absorbs float rounding of the scale)."""
    dropped = 0
    for node in list(gr.g.node):
        bounds = _clip_bounds(gr, node)
        if bounds is None:
            continue
        for q in gr.consumers(node.output[0]):
            rng = _q_range(gr, q, margin=0.25) if q.op_type == "QuantizeLinear" else None
            if rng is not None and bounds[0] <= rng[0] and rng[1] <= bounds[1]:
                q.input[0] = node.input[0]
                dropped += 1
    return dropped


def _move_q_before_reshape(gr: _Graph) -> int:
    """x -> Flatten/Reshape -> Q  becomes  x -> Q -> Flatten/Reshape (per-tensor Q commutes with
    a reshape), so that DQ -> GlobalAveragePool -> Q fuses into QLinearGlobalAveragePool."""
    moved = 0
    for q in list(gr.g.node):
        f = gr.producer.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if f is None or f.op_type not in ("Flatten", "Reshape") or _q_range(gr, q) is None:
            continue
        if len(gr.consumers(f.output[0])) != 1 or f.output[0] in {o.name for o in gr.g.output}:
            continue
        pre = f.output[0] + "_quantized"
        q.input[0], f.output[0], q.output[0], f.input[0] = f.input[0], q.output[0], pre, pre
        gr.producer = {o: n for n in gr.g.node for o in n.output}
        moved += 1
    return moved


def _remove_dead_nodes(gr: _Graph) -> None:
    outputs = {o.name for o in gr.g.output}
    while True:
        used = {i for n in gr.g.node for i in n.input} | outputs
        dead = [n for n in gr.g.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            gr.g.node.remove(n)


def _toposort(gr: _Graph) -> None:
    """Re-order the nodes topologically (rewiring may have moved a producer after a consumer)."""
    ready = {i.name for i in gr.g.input} | set(gr.inits) | {""}
    pending, order = list(gr.g.node), []
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            raise RuntimeError("export produced a cyclic ONNX graph; please report this model")
        for n in done:
            ready.update(n.output)
        order += done
        pending = rest
    del gr.g.node[:]
    gr.g.node.extend(order)


def simplify_qdq(model: Any) -> dict[str, int]:
    """Clean QDQ graph for ONNX Runtime's fusions, every rewrite exact: drop activations before a
    Q that clips at least as much, merge duplicate Qs, skip DQ -> Q pairs with equal qparams, move
    Q before Flatten/Reshape. Returns how many of each were done."""
    done = {}
    for name, fn in (("activations_dropped", _drop_noop_activations),
                     ("activations_before_q", _drop_activations_before_q),
                     ("duplicate_q", _merge_duplicate_quantizers),
                     ("requantize_skipped", _skip_requantize),
                     ("q_before_reshape", _move_q_before_reshape)):
        gr = _Graph(model)
        done[name] = fn(gr)
        _remove_dead_nodes(gr)
    gr = _Graph(model)
    _toposort(gr)
    _remove_unused_initializers(gr)
    return done


def _remove_unused_initializers(gr: _Graph) -> None:
    used = {i for n in gr.g.node for i in n.input} | {o.name for o in gr.g.output}
    for t in list(gr.g.initializer):
        if t.name not in used:
            gr.g.initializer.remove(t)


def _torch_export(model: nn.Module, example_input: torch.Tensor, path: str, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example_input,), path, opset_version=opset, dynamo=False,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          do_constant_folding=True)


@torch.no_grad()
def export_onnx(qmodel: nn.Module, path: str | os.PathLike[str], example_input: torch.Tensor,
                opset: int = 17) -> ExportInfo:
    """Write ``qmodel`` as a QDQ ONNX model that ONNX Runtime fuses into integer kernels.

    qmodel: a model returned by :func:`ptqkit.quantize` (any module tree whose quantized layers
    are QuantModules). example_input: one input batch (N, ...); the batch axis is dynamic.
    Returns an :class:`ExportInfo` with the container type of every layer.
    """
    import onnx

    if not quant_layers(qmodel):
        raise ValueError("export_onnx expects a quantized model (from ptqkit.quantize); the model "
                         "has no quantized layer")
    deploy, layers = deploy_copy(qmodel)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _torch_export(deploy, example_input, str(path), opset)
    model = onnx.load(str(path))
    gr = _Graph(model)
    folded = _fold_weight_quantizers(gr)
    gr = _Graph(model)
    notes = _quantize_biases(gr)
    rewrites = simplify_qdq(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    info = ExportInfo(path, layers, notes)
    if any(v["a_container"] == "8-bit, clipped" or v["w_bits"] < 8 for v in layers.values()):
        info.notes.append("sub-8-bit tensors are stored in 8-bit containers clipped to their grid "
                          "(ONNX Runtime does not fuse INT4/UINT4 QDQ into integer kernels)")
    slow = _slow_layer_notes(layers, cpu_info())
    info.float_layers = _ort_float_layers(path, layers)
    if info.float_layers:
        slow.append(f"{len(info.float_layers)} quantized layers run as float kernels in ONNX "
                    f"Runtime ({_names(info.float_layers)}): their output is not quantized, so "
                    "ONNX Runtime cannot fuse them into QLinearConv/QGemm - run the int_outputs "
                    "step as the recipe's last step")
    for note in slow:
        log.warning("export %s: %s", path.name, note)
    info.notes += slow
    log.info("exported %s: %d quantized layers, %d weight tensors as integers; QDQ rewrites %s",
             path, len(layers), folded, rewrites)
    return info


VNNI_FLAGS = ("avx512_vnni", "avx_vnni")
NO_VNNI_SAFE_WEIGHT = 64  # 2 * 255 * 64 <= 32767: a u8 x s8 pair sum cannot saturate int16


def cpu_info(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> dict[str, Any]:
    """This machine's CPU: {"model": model name, "x86": bool, "vnni": the VNNI flags it has
    (of avx512_vnni, avx_vnni)}; model "unknown" and no flags where ``cpuinfo`` is unreadable."""
    import platform

    model, flags = "unknown", set[str]()
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model == "unknown":
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return {"model": model, "x86": x86, "vnni": [f for f in VNNI_FLAGS if f in flags]}


def _names(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _slow_layer_notes(layers: dict[str, dict[str, Any]], cpu: dict[str, Any]) -> list[str]:
    """Notes on layers ONNX Runtime cannot run on its fast integer kernels, with the fix."""
    notes = []
    u8 = [n for n, v in layers.items() if v["w_type"] == "uint8"]
    if u8:
        notes.append(f"{len(u8)} layers ({_names(u8)}) have asymmetric 8-bit weights, exported "
                     "exactly as uint8 with per-channel zero-points: ONNX Runtime runs such integer "
                     "kernels on a slow path (EfficientNet-Lite0: 14x slower than float) - "
                     "quantize with w_symmetric=True (int8 weights, zero-point 0)")
    wide = [n for n, v in layers.items() if (v["w_max_abs"] or 0) > NO_VNNI_SAFE_WEIGHT]
    if wide and cpu["x86"] and not cpu["vnni"]:
        notes.append(f"{len(wide)} layers ({_names(wide)}) have int8 weights beyond "
                     f"+-{NO_VNNI_SAFE_WEIGHT} and this x86 CPU has no VNNI: ONNX Runtime's U8S8 "
                     "kernels add u8 x s8 pairs in saturating int16, so these layers can overflow "
                     "- quantize with 7-bit symmetric weights (w_bits=7, w_symmetric=True; ONNX "
                     "Runtime's reduce_range)")
    return notes


_FLOAT_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def _ort_float_layers(path: Path, layers: dict[str, dict[str, Any]]) -> list[str] | None:
    """Quantized layers whose Conv/Gemm/MatMul ONNX Runtime leaves in float after its fusions
    (None without onnxruntime)."""
    import tempfile

    import onnx

    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "optimized.onnx")
            ort_load(path, threads=1, optimized_path=out)
            nodes = [n.name for n in onnx.load(out).graph.node if n.op_type in _FLOAT_KERNELS]
    except ImportError:
        return None
    scopes = {name: "/" + name.replace(".", "/") + "/" for name in layers}
    return [name for name, scope in scopes.items() if any(n.startswith(scope) for n in nodes)]


def ort_load(path: str | os.PathLike[str], threads: int = 2, optimized_path: str | None = None,
             optimize: bool = True) -> Any:
    """The ONNX model at ``path`` loaded into ONNX Runtime's CPU provider with ``threads`` intra-op
    threads and all graph optimisations (none when ``optimize`` is False); ``optimized_path``
    saves the graph ONNX Runtime actually runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def optimized_op_counts(path: str | os.PathLike[str], workdir: str | os.PathLike[str]) -> Counter[str]:
    """Op types of the graph ONNX Runtime actually runs (after its fusions), e.g. QLinearConv."""
    import onnx

    out = str(Path(workdir) / (Path(path).stem + ".ort-optimized.onnx"))
    ort_load(path, threads=1, optimized_path=out)
    return Counter(n.op_type for n in onnx.load(out).graph.node)
