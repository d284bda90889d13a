"""Packed checkpoints from untrusted hands: decompression is bounded by the declared sizes and
malformed headers raise one-line ValueErrors naming the tensor or field, with little memory."""

from __future__ import annotations

import base64
import json
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tests.conftest import TinyNet
from torch import nn

import ptqkit
from ptqkit.export.packed import _digest

FAST = {"w_range": "minmax", "a_range": "minmax"}
FLOATS = "data.float32.shuffle4-zlib"
BOMB = 64 << 20  # bytes a bomb inflates to
PEAK = 8 << 20  # what loading the small checkpoint may allocate at most (Python + numpy)


@pytest.fixture
def saved(tiny, tiny_data, tmp_path) -> Path:
    qmodel = ptqkit.quantize(tiny, tiny_data, ptqkit.Recipe(w_bits=4, **FAST))
    return ptqkit.save(qmodel, tmp_path / "q.safetensors")


def _contents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["ptqkit"])


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: Any) -> None:
    """Write a crafted file whose SHA-256 matches, so only the crafted part can be refused."""
    if isinstance(meta, dict):
        meta = {**meta, "sha256": _digest(tensors)}
    save_file(tensors, str(path), metadata={"ptqkit": json.dumps(meta)})


def _model_map(meta: dict[str, Any]) -> dict[str, Any]:
    return json.loads(zlib.decompress(base64.b64decode(meta["model"])))


def _with_map(meta: dict[str, Any], raw: bytes) -> dict[str, Any]:
    """meta with its deflated model map replaced by ``raw`` (a declared size follows it)."""
    meta = {**meta, "model": base64.b64encode(zlib.compress(raw, 9)).decode()}
    if "model_size" in meta:
        meta["model_size"] = len(raw)
    return meta


def _refused(path: Path, *parts: str) -> str:
    """Loading raises a one-line ValueError holding every part, within ``PEAK`` bytes of memory
    (Python and numpy allocations); returns the message."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            ptqkit.load(path, TinyNet)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(info.value)
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)
    assert peak < PEAK, peak
    return msg


def _floats(n: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(zlib.compress(bytes(4 * n), 9)), dtype=torch.uint8)


def test_zlib_bomb_in_the_float_bucket_is_refused_with_little_memory(saved) -> None:
    tensors, meta = _contents(saved)
    tensors[FLOATS] = _floats(BOMB // 4)
    assert tensors[FLOATS].numel() < BOMB // 500
    _write(saved, tensors, meta)
    _refused(saved, FLOATS, "bytes")


def test_zlib_bomb_in_the_model_map_is_refused_with_little_memory(saved) -> None:
    tensors, meta = _contents(saved)
    model_map = _model_map(meta)
    raw = json.dumps(model_map)[:-1].encode() + b', "pad": "' + b" " * BOMB + b'"}'
    meta = _with_map(meta, raw)
    meta.pop("model_size", None)  # nothing declared: the bound of every map applies
    _write(saved, tensors, meta)
    _refused(saved, "'model'", "bytes")


def test_model_map_larger_than_its_declared_size_is_refused(saved) -> None:
    tensors, meta = _contents(saved)
    raw = json.dumps(_model_map(meta)).encode()
    meta = {**_with_map(meta, raw), "model_size": len(raw) - 10}
    _write(saved, tensors, meta)
    _refused(saved, "'model'", str(len(raw) - 10))


@pytest.mark.parametrize("extra", [-3, 5])
def test_float_bucket_of_another_size_than_the_layout_is_refused(saved, extra) -> None:
    tensors, meta = _contents(saved)
    n = zlib.decompressobj().decompress(tensors[FLOATS].numpy().tobytes())
    tensors[FLOATS] = _floats(len(n) // 4 + extra)
    _write(saved, tensors, meta)
    _refused(saved, FLOATS, str(len(n)))


@pytest.mark.parametrize("extra", [-2, 3])
def test_packed_bucket_of_another_size_than_the_layout_is_refused(saved, extra) -> None:
    tensors, meta = _contents(saved)
    codes = tensors["data.uint8"]
    tensors["data.uint8"] = (codes[:extra] if extra < 0
                             else torch.cat([codes, torch.zeros(extra, dtype=torch.uint8)]))
    _write(saved, tensors, meta)
    _refused(saved, "'data.uint8'", str(codes.numel()))


def test_map_that_lies_about_the_bit_width_is_refused(saved) -> None:
    from ptqkit.export import packed

    tensors, meta = _contents(saved)
    model_map = _model_map(meta)
    model_map["layers"]["dw"][2] = 8  # 4-bit codes read as 8-bit: twice the bytes
    meta = _with_map(meta, json.dumps(model_map).encode())
    skeleton = packed._skeleton(TinyNet(), packed._decode_map(meta))
    meta["layout"] = packed._layout_digest(packed._expected_layout(skeleton, packed._decode_map(meta)))
    _write(saved, tensors, meta)
    _refused(saved, "'data.uint8'")


@pytest.mark.parametrize("field, value, part", [
    (1, [8, 1.0, 3, 3], "'shape'"),  # compares equal to the model's shape in Python
    (1, "8x1x3x3", "'shape'"),
    (1, [-8, 1, 3, 3], "'shape'"),
    (1, [10**12, 1, 3, 3], "'shape'"),
    (2, "4", "'w_bits'"),
    (2, 4.0, "'w_bits'"),
    (3, "false", "'w_symmetric'"),
    (8, 1, "'bias'"),
    (10, "8", "'o_bits'"),
])
def test_malformed_layer_field_names_the_layer_and_field(saved, field, value, part) -> None:
    tensors, meta = _contents(saved)
    model_map = _model_map(meta)
    model_map["layers"]["conv1"][field] = value
    _write(saved, tensors, _with_map(meta, json.dumps(model_map).encode()))
    _refused(saved, "conv1", part, repr(value))


@pytest.mark.parametrize("change, part", [
    (lambda m: m["layers"].update(conv1=m["layers"]["conv1"][:3]), "conv1"),
    (lambda m: m.update(layers=[1, 2]), "'layers'"),
    (lambda m: m.update(layer_order="conv1"), "'layer_order'"),
    (lambda m: m.update(layer_order=[1]), "'layer_order'"),
    (lambda m: m.update(outputs={"fc": 8}), "'outputs'"),
    (lambda m: m.update(outputs={"fc": ["8", True]}), "'outputs'"),
])
def test_malformed_map_structure_is_a_value_error(saved, change, part) -> None:
    tensors, meta = _contents(saved)
    model_map = _model_map(meta)
    change(model_map)
    _write(saved, tensors, _with_map(meta, json.dumps(model_map).encode()))
    _refused(saved, part)


@pytest.mark.parametrize("change, part", [
    (lambda meta: [meta], "ptqkit"),
    (lambda meta: {**meta, "model": "not base64!"}, "'model'"),
    (lambda meta: {**meta, "model": base64.b64encode(b"not zlib").decode()}, "'model'"),
    (lambda meta: {**meta, "model": 12}, "'model'"),
    (lambda meta: {**meta, "model_size": -1}, "'model_size'"),
    (lambda meta: {**meta, "model_size": "big"}, "'model_size'"),
    (lambda meta: {**meta, "model": base64.b64encode(zlib.compress(b"[" * 5000)).decode(),
                   "model_size": 5000}, "not JSON"),
])
def test_malformed_metadata_is_a_value_error(saved, change, part) -> None:
    tensors, meta = _contents(saved)
    _write(saved, tensors, change(meta))
    _refused(saved, part)


def _safetensors_header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header: dict[str, Any], body: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)


@pytest.mark.parametrize("shape", [[10**12], [159], [161]])
def test_safetensors_shape_that_lies_about_the_data_size_names_the_tensor(saved, shape) -> None:
    header, body = _safetensors_header(saved)
    header["data.uint8"]["shape"] = shape
    _write_header(saved, header, body)
    _refused(saved, "'data.uint8'", "corrupted or truncated")


def test_safetensors_data_past_the_end_of_the_file_names_the_tensor(saved) -> None:
    header, body = _safetensors_header(saved)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    _write_header(saved, header, body[:-3])
    _refused(saved, repr(last), "corrupted or truncated")


def test_bucket_of_the_wrong_dtype_is_refused(saved) -> None:
    tensors, meta = _contents(saved)
    tensors["data.uint8"] = tensors["data.uint8"].to(torch.int16)
    _write(saved, tensors, meta)
    _refused(saved, "'data.uint8'", "int16")


def test_missing_bucket_is_refused(saved) -> None:
    tensors, meta = _contents(saved)
    del tensors["data.uint8"]
    _write(saved, tensors, meta)
    _refused(saved, "'data.uint8'")


class ReflectNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, padding_mode="reflect")


def test_padding_mode_the_checkpoint_cannot_hold_names_the_layer(saved, tiny_data, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"'dw'.*padding_mode='reflect'") as info:
        ptqkit.load(saved, ReflectNet)
    assert "\n" not in str(info.value)
    reflect = ptqkit.quantize(ReflectNet().eval(), tiny_data, ptqkit.Recipe(**FAST))
    path = ptqkit.save(reflect, tmp_path / "reflect.safetensors")
    with pytest.raises(ValueError, match=r"'dw'.*padding_mode='reflect'"):
        ptqkit.load(path, ReflectNet)
