"""Packed quantized checkpoint: integer weights at their bit width, in one safetensors file.

Layout (format version 2; version 1 files still load):
- tensors: for every quantized layer with active weights, ``<layer>.weight.packed`` (uint8: the
  codes q - qmin as a little bit stream, ``bits`` bits per weight, so two 4-bit weights per byte)
  and ``<layer>.w_quant.zero_point`` as uint8/int8 - omitted when all zero (symmetric weights);
  every other entry of the quantized model's state_dict as is (per-channel scales, biases,
  activation qparams, output quantizers of the int_outputs step, float layers). Tensors of one
  dtype are concatenated into one bucket; the float32 bucket is stored byte-shuffled (the four
  byte planes one after the other, so sign/exponent bytes sit together) and deflated (zlib), which
  is lossless: the floats come back bit for bit.
- metadata ``ptqkit``: a JSON map with the format name and version, the codec, the recipe, a
  SHA-256 of all stored bytes (detects corruption), a layout digest, and ``model``: the deflated,
  base64 JSON of the layer order, per-layer type / shape / bits / symmetry and the module outputs
  with a quantizer (int_outputs step), with ``model_size``, its inflated size in bytes.

Loading trusts no size in the file: every inflated size is bounded before it is allocated - the
float bucket by the float32 values the model's layout needs, the map by ``model_size`` and by
what a map of the given model can need (``_map_bound``) - every bucket must hold exactly what the
layout needs, and the map's fields are type-checked. Anything else raises a one-line ValueError
naming the tensor or field.

Loading rebuilds the quantized model from the float architecture without data: BN is folded
(giving the same module tree), the named layers are swapped, the stored values loaded. The
weights are the dequantized integers s * (q - z); re-quantizing them gives q again, so outputs are
bit-identical to the saved simulated model.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..algorithms.int_outputs import install_output_quantizer, output_quantizers
from ..core.quantizer import Quantizer
from ..core.spec import SUPPORTED_BITS, QuantSpec
from ..nn.modules import REGISTRY, QuantModule, quant_class_for, quant_layers
from ..nn.prepare import PTQState, _fold_all, set_module

__all__ = ["FORMAT", "FORMAT_VERSION", "pack_bits", "unpack_bits", "save", "load"]

FORMAT, FORMAT_VERSION = "ptqkit-packed", 2
_READABLE_VERSIONS = (1, 2)
_FLOAT_CODEC = "shuffle4-zlib"
_MAX_MAP_BYTES = 64 << 20  # no inflated map may exceed this (millions of layers)
_MAX_DIM = 2**31 - 1


def _bad(path: object, what: str) -> ValueError:
    """The error of a file whose content is not what ptqkit.save writes (one line)."""
    return ValueError(f"{path}: {what}; the file is corrupted or was not written by ptqkit.save")


def _inflate(data: bytes, size: int, what: str, path: object, source: str,
             exact: bool = True) -> bytes:
    """zlib-inflate ``data`` to ``size`` bytes (``exact``) or at most ``size`` bytes, allocating
    no more than that: a stream that would inflate further, ends early or has trailing bytes
    raises ValueError naming ``what`` and the ``source`` of the size ("the layout needs")."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, size + 1)
    except zlib.error as exc:
        raise _bad(path, f"{what} is not deflate data ({exc})") from exc
    if len(out) > size:
        raise _bad(path, f"{what} inflates to more than {size} bytes, the size {source}")
    if not inflater.eof or inflater.unused_data:
        raise _bad(path, f"{what} is a truncated deflate stream or has trailing bytes")
    if exact and len(out) != size:
        raise _bad(path, f"{what} inflates to {len(out)} bytes, not {size}, the size {source}")
    return out


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integer codes (N,) in [0, 2^bits) into a uint8 bit stream of ceil(N*bits/8)."""
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if codes.size and int(codes.max()) >= 2**bits:
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    if bits == 8:
        return codes.copy()
    stream = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: (count,) uint8 codes."""
    if bits == 8:
        return np.asarray(packed, dtype=np.uint8)[:count].copy()
    stream = np.unpackbits(np.asarray(packed, dtype=np.uint8), bitorder="little")
    if stream.size < count * bits:
        raise ValueError(f"packed weights hold {stream.size // bits} values, expected {count}")
    rows = stream[:count * bits].reshape(count, bits)
    return np.packbits(rows, axis=1, bitorder="little").reshape(-1)


_ENTRY = ("type", "shape", "w_bits", "w_symmetric", "a_bits", "a_symmetric", "w_enabled",
          "a_enabled", "bias", "packed", "o_bits", "zp", "o_symmetric")  # v1: up to "o_bits"
_V1_FIELDS = _ENTRY.index("o_bits") + 1
_BITS = "bits"  # field kinds of _ENTRY besides Python types
_FIELD_KINDS: dict[str, Any] = {
    "type": str, "shape": "shape", "w_bits": _BITS, "a_bits": _BITS, "o_bits": (_BITS, None)}


def _kind_ok(value: Any, kind: Any) -> bool:
    if isinstance(kind, tuple):
        return any(_kind_ok(value, k) for k in kind)
    if kind is None:
        return value is None
    if kind == _BITS:
        return type(value) is int and value in SUPPORTED_BITS
    if kind == "shape":
        return (isinstance(value, list) and 1 <= len(value) <= 8
                and all(type(d) is int and 0 <= d <= _MAX_DIM for d in value))
    return type(value) is kind


_KIND_TEXT = {str: "a string", bool: "true or false",
              "shape": f"a list of 1 to 8 ints in 0..{_MAX_DIM}",
              _BITS: f"one of {SUPPORTED_BITS}", None: "null"}


def _kind_text(kind: Any) -> str:
    return " or ".join(map(_kind_text, kind)) if isinstance(kind, tuple) else _KIND_TEXT[kind]


def _check_map(meta: dict[str, Any], path: object) -> None:
    """Type-check the map's ``layers``, ``layer_order`` and ``outputs`` (ValueError naming the
    tensor or field), so that loading never meets a value of another type."""
    layers = meta.get("layers")
    if not isinstance(layers, dict):
        raise _bad(path, f"map field 'layers' must be a mapping, got {_short(layers)}")
    for name, entry in layers.items():
        where = f"map entry of tensor '{name}.weight'"
        if not isinstance(entry, list) or not _V1_FIELDS <= len(entry) <= len(_ENTRY):
            raise _bad(path, f"{where} must be a list of {_V1_FIELDS} to {len(_ENTRY)} fields, "
                             f"got {_short(entry)}")
        for field, value in zip(_ENTRY, entry):
            kind = _FIELD_KINDS.get(field, bool)
            if not _kind_ok(value, kind):
                raise _bad(path, f"{where}: field {field!r} must be {_kind_text(kind)}, got "
                                 f"{_short(value)}")
        if entry[_ENTRY.index("packed")] and entry[_ENTRY.index("w_bits")] > 8:
            raise _bad(path, f"{where}: packed weights have at most 8 bits, got field 'w_bits' "
                             f"{entry[_ENTRY.index('w_bits')]}")
    order = meta.get("layer_order")
    if not (isinstance(order, list) and all(isinstance(n, str) for n in order)):
        raise _bad(path, f"map field 'layer_order' must be a list of layer names, got "
                         f"{_short(order)}")
    outputs = meta.get("outputs", {})
    if not isinstance(outputs, dict) or not all(
            isinstance(v, list) and len(v) == 2 and _kind_ok(v[0], _BITS)
            and _kind_ok(v[1], bool) for v in outputs.values()):
        raise _bad(path, "map field 'outputs' must map module paths to [bits, symmetric], got "
                         f"{_short(outputs)}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_mapping(raw: bytes | str, what: str,
                  error: Callable[[str], ValueError]) -> dict[str, Any]:
    """``raw`` parsed as a JSON mapping, else ``error(reason)`` raised, the reason naming ``what``
    (deep nesting included: no RecursionError escapes)."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not JSON ({type(exc).__name__})") from exc
    if not isinstance(value, dict):
        raise error(f"{what} must be a JSON mapping, got {_short(value)}")
    return value


def _has_zero_points(layer: QuantModule) -> bool:
    return layer.w_quant.active and bool((layer.w_quant.qparams()[1] != 0).any())


def _layer_entry(layer: QuantModule) -> list[Any]:
    """One layer of the map as a list in ``_ENTRY`` order (compact JSON)."""
    w, a, o = layer.w_quant.spec, layer.a_quant.spec, layer.o_quant
    return [type(layer).__name__, list(layer.weight.shape), w.bits, w.symmetric, a.bits,
            a.symmetric, layer.w_quant.enabled, layer.a_quant.enabled, layer.bias is not None,
            layer.w_quant.active, o.spec.bits if o is not None else None, _has_zero_points(layer),
            o.spec.symmetric if o is not None else False]


def _entries(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{layer: entry dict}; fields a version-1 map lacks get their version-1 meaning."""
    defaults = {"zp": True, "o_symmetric": False}
    return {n: {**defaults, **dict(zip(_ENTRY, e))} for n, e in meta["layers"].items()}


def _encode_floats(bucket: torch.Tensor) -> torch.Tensor:
    """float32 (N,) -> uint8: byte planes one after the other (shuffle), deflated. Lossless."""
    planes = bucket.contiguous().view(torch.uint8).reshape(-1, 4).T.contiguous().numpy()
    return torch.frombuffer(bytearray(zlib.compress(planes.tobytes(), 9)), dtype=torch.uint8)


def _decode_floats(blob: torch.Tensor, count: int | None = None, path: object = "") -> torch.Tensor:
    """Inverse of :func:`_encode_floats`. count: the number of floats the blob must hold; it
    bounds the inflated size (None, for trusted blobs only: whatever the blob holds)."""
    data = blob.numpy().tobytes()
    what = f"tensor 'data.float32.{_FLOAT_CODEC}'"
    raw = (zlib.decompress(data) if count is None
           else _inflate(data, 4 * count, what, path, "the model's layout needs"))
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(4, -1).T.copy()
    return torch.from_numpy(planes.reshape(-1)).view(torch.float32)


def _encode_map(model_map: dict[str, Any]) -> tuple[str, int]:
    """(base64 of the deflated JSON, the JSON's size in bytes)."""
    raw = json.dumps(model_map, separators=(",", ":")).encode()
    return base64.b64encode(zlib.compress(raw, 9)).decode(), len(raw)


def _map_bound(model: nn.Module) -> int:
    """Bytes the JSON map of ``model`` can need at most: per module a layer entry, its name in
    the layer order and an output quantizer, each far below this budget."""
    return min(_MAX_MAP_BYTES, 4096 + sum(512 + 4 * len(n) for n, _ in model.named_modules()))


def _decode_map(meta: dict[str, Any], path: object = "",
                limit: int = _MAX_MAP_BYTES) -> dict[str, Any]:
    """The map with its deflated ``model`` part (version 2) unpacked into plain keys. It
    inflates to exactly its declared ``model_size`` when given, and never beyond ``limit``."""
    if "model" not in meta:
        return meta
    blob, declared = meta["model"], meta.get("model_size")
    if declared is not None and not (type(declared) is int and 0 <= declared <= limit):
        raise _bad(path, f"metadata field 'model_size' must be an int in 0..{limit} (what a map "
                         f"of this model can need), got {_short(declared)}")
    try:
        if not isinstance(blob, str):
            raise TypeError(f"got {type(blob).__name__}")
        data = base64.b64decode(blob, validate=True)
    except (TypeError, binascii.Error) as exc:
        raise _bad(path, f"metadata field 'model' is not a base64 string ({exc})") from exc
    size = limit if declared is None else declared
    source = ("metadata field 'model_size' declares" if declared is not None
              else "a map of this model can need")
    raw = _inflate(data, size, "metadata field 'model'", path, source, exact=declared is not None)
    return {**meta, **_json_mapping(raw, "metadata field 'model'", lambda w: _bad(path, w))}


def _layout(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str, int]]:
    """(key, dtype, numel) of every stored tensor, in the order they are concatenated."""
    return [(k, str(tensors[k].dtype).removeprefix("torch."), tensors[k].numel())
            for k in sorted(tensors)]


def _buckets(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate all tensors of one dtype (sorted by key) into one flat tensor per dtype: one
    safetensors header entry per dtype instead of one per tensor keeps small models small."""
    parts: dict[str, list[torch.Tensor]] = {}
    for key, dtype, _ in _layout(tensors):
        parts.setdefault(f"data.{dtype}", []).append(tensors[key].reshape(-1))
    return {k: torch.cat(v) for k, v in parts.items()}


def _layout_digest(layout: list[tuple[str, str, int]]) -> str:
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _packed_tensors(qmodel: nn.Module, layers: dict[str, QuantModule]) -> dict[str, torch.Tensor]:
    tensors = {k: v.detach().contiguous().clone() for k, v in qmodel.state_dict().items()}
    for name, layer in layers.items():
        if not layer.w_quant.active:
            continue
        spec = layer.w_quant.spec
        codes = layer.w_quant.int_repr(layer.weight.detach()) - spec.qmin
        packed = pack_bits(codes.numpy().astype(np.uint8), spec.bits)
        del tensors[f"{name}.weight"]
        tensors[f"{name}.weight.packed"] = torch.from_numpy(packed)
        zp_type = torch.int8 if spec.symmetric else torch.uint8  # the zero-point is on the grid
        tensors[f"{name}.w_quant.zero_point"] = layer.w_quant.qparams()[1].to(zp_type)
        if not _has_zero_points(layer):
            del tensors[f"{name}.w_quant.zero_point"]  # all zero: rebuilt on load
    return tensors


def save(qmodel: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``qmodel`` (from :func:`ptqkit.quantize`) as a packed checkpoint; returns the path."""
    from safetensors.torch import save_file

    layers = quant_layers(qmodel)
    if not layers:
        raise ValueError("save expects a quantized model (from ptqkit.quantize); it has no "
                         "quantized layer")
    tensors = _packed_tensors(qmodel, layers)
    buckets = _buckets(tensors)
    if "data.float32" in buckets:
        buckets[f"data.float32.{_FLOAT_CODEC}"] = _encode_floats(buckets.pop("data.float32"))
    recipe = getattr(getattr(qmodel, "report", None), "recipe", None)
    model_map = {
        "layer_order": list(getattr(getattr(qmodel, "ptq", None), "layer_order", []) or layers),
        "layers": {n: _layer_entry(m) for n, m in layers.items()},
        "outputs": {n: [q.spec.bits, q.spec.symmetric] for n, q in output_quantizers(qmodel).items()}}
    encoded_map, map_size = _encode_map(model_map)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "codec": _FLOAT_CODEC,
            "recipe": recipe, "model": encoded_map, "model_size": map_size,
            "layout": _layout_digest(_layout(tensors)), "sha256": _digest(buckets)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(buckets, str(tmp), metadata={"ptqkit": json.dumps(meta, separators=(",", ":"))})
    os.replace(tmp, path)
    return path


_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 << 20  # safetensors refuses larger headers too


def _check_header(path: Path) -> None:
    """Check the safetensors header before safetensors reads it, so that a tensor whose declared
    shape and dtype do not match its data offsets, or whose data lies past the end of the file,
    is named: every tensor must span exactly shape x item size bytes inside the file."""
    def broken(what: str) -> ValueError:
        return ValueError(f"{path} is corrupted or truncated ({what}); save the model again "
                          "with ptqkit.save")

    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(size - 8, _MAX_HEADER):
            raise broken(f"a header of {n} bytes does not fit in a file of {size} bytes")
        header = _json_mapping(f.read(n), "the header", broken)
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if (dtype not in _ITEM_BYTES or not isinstance(shape, list)
                or not all(type(d) is int and d >= 0 for d in shape)
                or not (isinstance(offsets, list) and len(offsets) == 2
                        and all(type(o) is int and o >= 0 for o in offsets))):
            raise broken(f"tensor {name!r}: header entry {_short(info)} is not a dtype, a shape "
                         "of non-negative ints and two data offsets")
        nbytes = _ITEM_BYTES[dtype] * math.prod(shape)
        if offsets[1] - offsets[0] != nbytes or offsets[1] > data_size:
            raise broken(f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, its "
                         f"data offsets {offsets} span {offsets[1] - offsets[0]} bytes of the "
                         f"{data_size} the file holds")


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The stored tensors (the float bucket still deflated) and the ``ptqkit`` metadata (its
    map still deflated), checked for format, version, SHA-256 and codec."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"packed checkpoint {path} not found")
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("ptqkit")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types on bad headers/data
        raise ValueError(f"{path} is corrupted or truncated (not a readable safetensors file: "
                         f"{exc}); save the model again with ptqkit.save") from exc
    if raw is None:
        raise ValueError(f"{path} has no ptqkit map in its metadata; it was not written by "
                         "ptqkit.save")
    meta = _json_mapping(raw, "metadata 'ptqkit'", lambda w: _bad(path, w))
    if meta.get("format") != FORMAT or meta.get("format_version") not in _READABLE_VERSIONS:
        raise ValueError(f"{path}: format {meta.get('format')!r} version "
                         f"{meta.get('format_version')!r} is not supported (expected {FORMAT!r} "
                         f"version {FORMAT_VERSION}); save it again with this ptqkit version")
    if _digest(tensors) != meta.get("sha256"):
        raise ValueError(f"{path} is corrupted: its tensor data does not match the stored SHA-256;"
                         " save the model again with ptqkit.save")
    if meta.get("codec", _FLOAT_CODEC) != _FLOAT_CODEC:
        raise _bad(path, f"metadata field 'codec' must be {_FLOAT_CODEC!r}, got "
                         f"{_short(meta.get('codec'))}")
    return tensors, meta


def _bucket_tensors(tensors: dict[str, torch.Tensor], layout: list[tuple[str, str, int]],
                    path: object) -> dict[str, torch.Tensor]:
    """The flat bucket of every dtype the layout needs, checked to hold exactly its values (the
    float bucket inflated to that size at most) before anything is split or unpacked."""
    need: dict[str, int] = {}
    for _, dtype, numel in layout:
        need[f"data.{dtype}"] = need.get(f"data.{dtype}", 0) + numel
    tensors = dict(tensors)
    encoded = f"data.float32.{_FLOAT_CODEC}"
    if encoded in tensors and "data.float32" in need:
        blob = tensors.pop(encoded)
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise _bad(path, f"tensor {encoded!r} must be a flat uint8 tensor, got "
                             f"{str(blob.dtype).removeprefix('torch.')}{list(blob.shape)}")
        tensors["data.float32"] = _decode_floats(blob, need["data.float32"], path)
    for key, numel in need.items():
        t = tensors.get(key)
        if t is None:
            raise _bad(path, f"tensor {key!r} is missing; the model's layout needs {numel} values "
                             "in it")
        dtype = str(t.dtype).removeprefix("torch.")
        if f"data.{dtype}" != key or t.dim() != 1 or t.numel() != numel:
            raise _bad(path, f"tensor {key!r} holds {dtype}{list(t.shape)}, but the model's "
                             f"layout needs {numel} {key.removeprefix('data.')} values")
    return tensors


def _skeleton(model: nn.Module, meta: dict[str, Any]) -> nn.Module:
    """BN-folded copy of ``model`` with the map's layers swapped for quantized ones (no data)."""
    import copy

    qmodel = copy.deepcopy(model).eval()
    state = PTQState()
    folded = _fold_all(qmodel, state, {})
    mods = dict(qmodel.named_modules())
    problems = []
    for name, entry in _entries(meta).items():
        mod = mods.get(name)
        if mod is not None and quant_class_for(mod)[1]:
            padding = getattr(mod, "padding_mode", "zeros")
            own = f"padding_mode={padding!r}" if padding != "zeros" else "a forward of its own"
            problems.append(f"{name!r} (model: {type(mod).__name__} with {own}; a packed "
                            "checkpoint rebuilds layers run by the standard op only)")
            continue
        qcls = REGISTRY.get(type(mod)) if mod is not None else None
        if (mod is None or qcls is None or qcls.__name__ != entry["type"]
                or list(mod.weight.shape) != entry["shape"]):
            found = "missing" if mod is None else f"{type(mod).__name__}{list(mod.weight.shape)}"
            problems.append(f"{name!r} (map: {entry['type']}{entry['shape']}, model: {found})")
            continue
        w_spec = QuantSpec(entry["w_bits"], entry["w_symmetric"], "channel")
        q = qcls(mod, w_spec, QuantSpec(entry["a_bits"], entry["a_symmetric"]))
        q.folded_bn = folded.get(name)
        q.w_quant.enabled, q.a_quant.enabled = entry["w_enabled"], entry["a_enabled"]
        if entry["bias"]:
            q.ensure_bias()
        if entry.get("o_bits") is not None:
            q.o_quant = Quantizer(QuantSpec(entry["o_bits"], symmetric=entry["o_symmetric"]))
        set_module(qmodel, name, q)
    for path, (bits, symmetric) in meta.get("outputs", {}).items():
        try:
            install_output_quantizer(qmodel, path, Quantizer(QuantSpec(bits, symmetric)))
        except AttributeError:
            problems.append(f"{path!r} (map: a module output quantizer, model: no such module)")
    if problems:
        raise ValueError("the checkpoint's map does not match the model: " + "; ".join(problems)
                         + "; pass the same architecture the checkpoint was saved from")
    for p in qmodel.parameters():
        p.requires_grad_(False)
    state.layer_order = list(meta["layer_order"])
    qmodel.ptq = state  # type: ignore[assignment]
    return qmodel


def _expected_layout(qmodel: nn.Module, meta: dict[str, Any]) -> list[tuple[str, str, int]]:
    """The layout ``save`` writes for this skeleton (shapes from the model, bits from the map)."""
    layout = {k: (str(v.dtype).removeprefix("torch."), v.numel()) for k, v in qmodel.state_dict().items()}
    for name, e in _entries(meta).items():
        if e["packed"]:
            numel = layout.pop(f"{name}.weight")[1]
            layout[f"{name}.weight.packed"] = ("uint8", -(-numel * e["w_bits"] // 8))
            layout[f"{name}.w_quant.zero_point"] = ("int8" if e["w_symmetric"] else "uint8",
                                                    layout[f"{name}.w_quant.zero_point"][1])
            if not e["zp"]:
                del layout[f"{name}.w_quant.zero_point"]
    return [(k, *layout[k]) for k in sorted(layout)]


def _split(buckets: dict[str, torch.Tensor],
           layout: list[tuple[str, str, int]]) -> dict[str, torch.Tensor]:
    offsets = dict.fromkeys(buckets, 0)
    out = {}
    for key, dtype, numel in layout:
        b = f"data.{dtype}"
        out[key] = buckets[b][offsets[b]:offsets[b] + numel]
        offsets[b] += numel
    return out


def _unpacked_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    qmodel: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(tensors)
    ref = qmodel.state_dict()
    for key, value in list(state.items()):
        if key in ref:
            state[key] = value.reshape(ref[key].shape)
    for name, entry in _entries(meta).items():
        if not entry["packed"]:
            continue
        spec = QuantSpec(entry["w_bits"], entry["w_symmetric"], "channel")
        count = int(np.prod(entry["shape"]))
        codes = unpack_bits(state.pop(f"{name}.weight.packed").numpy(), spec.bits, count)
        q = torch.from_numpy(codes.astype(np.float32) + spec.qmin).reshape(entry["shape"])
        zp_key = f"{name}.w_quant.zero_point"
        zp = state[zp_key].to(torch.float32) if entry["zp"] else torch.zeros(entry["shape"][0])
        scale = state[f"{name}.w_quant.scale"].clamp(min=1e-8)
        shape = [-1] + [1] * (q.dim() - 1)
        state[zp_key] = zp
        state[f"{name}.weight"] = (q - zp.reshape(shape)) * scale.reshape(shape)
    return state


def load(path: str | os.PathLike[str],
         model_factory_or_float_model: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    """Rebuild the quantized model saved by :func:`save`.

    model_factory_or_float_model: the float architecture (an nn.Module, or a callable returning
    one); its weights are not used. Raises a one-line ValueError on a corrupted, truncated or
    malformed file (naming the tensor or field: a deflate stream inflating beyond its declared
    size, a bucket of another size than the layout needs, a map field of the wrong type), a wrong
    format version, or a map that does not match the model. Nothing is inflated beyond the size
    the model's layout and map need.
    """
    tensors, meta = _read(Path(path))
    model = model_factory_or_float_model
    if not isinstance(model, nn.Module):
        model = model()
    meta = _decode_map(meta, path, _map_bound(model))
    _check_map(meta, path)
    qmodel = _skeleton(model, meta)
    layout = _expected_layout(qmodel, meta)
    if _layout_digest(layout) != meta.get("layout"):
        raise ValueError("the checkpoint does not match the model: its tensors (names, dtypes, "
                         "sizes) differ from what this architecture needs; pass the same "
                         "architecture the checkpoint was saved from")
    state = _unpacked_state(_split(_bucket_tensors(tensors, layout, path), layout), meta, qmodel)
    result = qmodel.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"the checkpoint does not match the model: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    return qmodel
