"""Packed checkpoint: bit packing, bit-identical reload, size, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tests.conftest import TinyNet
from torch import nn

import ptqkit
from ptqkit.export.packed import pack_bits, unpack_bits

FAST = {"w_range": "minmax", "a_range": "minmax"}


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_roundtrip(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=1001).astype(np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.size == -(-1001 * bits // 8)
    np.testing.assert_array_equal(unpack_bits(packed, bits, 1001), codes)


def test_two_4bit_values_per_byte():
    np.testing.assert_array_equal(pack_bits(np.array([1, 2, 15, 0]), 4), [0x21, 0x0F])


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("symmetric", [False, True])
def test_reload_is_bit_identical(tiny, tiny_data, tmp_path, bits, symmetric):
    recipe = ptqkit.Recipe(w_bits=bits, a_bits=bits, w_symmetric=symmetric, first_last_8bit=False,
                           **FAST)
    qmodel = ptqkit.quantize(tiny, tiny_data, recipe)
    ptqkit.save(qmodel, tmp_path / "q.safetensors")
    loaded = ptqkit.load(tmp_path / "q.safetensors", TinyNet)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tiny_data), qmodel(tiny_data), rtol=0, atol=0)
    assert loaded.ptq.layer_order == qmodel.ptq.layer_order


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv3(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def test_w4_checkpoint_is_at_most_one_seventh_of_float(tmp_path, tiny_data):
    model = Wide().eval()
    save_file(model.state_dict(), str(tmp_path / "float.safetensors"))
    qmodel = ptqkit.quantize(model, tiny_data, ptqkit.Recipe(w_bits=4, a_bits=8, **FAST))
    ptqkit.save(qmodel, tmp_path / "w4.safetensors")
    ratio = (tmp_path / "w4.safetensors").stat().st_size / (tmp_path / "float.safetensors").stat().st_size
    assert ratio <= 1 / 7, ratio


@pytest.fixture
def saved(tiny, tiny_data, tmp_path):
    qmodel = ptqkit.quantize(tiny, tiny_data, ptqkit.Recipe(w_bits=4, **FAST))
    ptqkit.save(qmodel, tmp_path / "q.safetensors")
    return tmp_path / "q.safetensors"


def test_truncated_file(saved):
    saved.write_bytes(saved.read_bytes()[:-100])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        ptqkit.load(saved, TinyNet)


def test_corrupted_data(saved):
    data = bytearray(saved.read_bytes())
    data[-5] ^= 0xFF
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        ptqkit.load(saved, TinyNet)


def test_wrong_format_version(saved):
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["ptqkit"]), {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = 99
    save_file(tensors, str(saved), metadata={"ptqkit": json.dumps(meta)})
    with pytest.raises(ValueError, match="version 99 is not supported"):
        ptqkit.load(saved, TinyNet)


def test_map_does_not_match_model(saved):
    with pytest.raises(ValueError, match="does not match the model"):
        ptqkit.load(saved, Wide)


def test_float_codec_is_lossless():
    from ptqkit.export.packed import _decode_floats, _encode_floats

    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -3.4e38])
    x = torch.cat([special, torch.randn(1001, generator=torch.Generator().manual_seed(0))])
    back = _decode_floats(_encode_floats(x))
    torch.testing.assert_close(back.view(torch.int32), x.view(torch.int32), rtol=0, atol=0)


def test_all_zero_weight_zero_points_are_not_stored(tiny, tiny_data, tmp_path):
    from safetensors import safe_open

    from ptqkit.export.packed import _decode_map, _entries

    for symmetric in (True, False):
        qmodel = ptqkit.quantize(tiny, tiny_data, ptqkit.Recipe(w_bits=4, w_symmetric=symmetric,
                                                                 **FAST))
        ptqkit.save(qmodel, tmp_path / "q.safetensors")
        with safe_open(str(tmp_path / "q.safetensors"), framework="pt") as f:
            entries = _entries(_decode_map(json.loads(f.metadata()["ptqkit"])))
        assert {e["zp"] for e in entries.values()} == {not symmetric}
        loaded = ptqkit.load(tmp_path / "q.safetensors", TinyNet)
        with torch.no_grad():
            torch.testing.assert_close(loaded(tiny_data), qmodel(tiny_data), rtol=0, atol=0)
