from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ptqkit.zoo import fmnist_calibration, fmnist_test, load_model
from ptqkit.zoo.fmnist import DatasetMissingError, calibration_indices, find_data_dir, load_split
from ptqkit.zoo.models import mobilenetv2, resnet20


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_reads_idx_files(fake_fmnist: Path) -> None:
    x, y = load_split("test", fake_fmnist, normalize=False)
    assert x.shape == (20, 1, 28, 28) and y.tolist() == [i % 10 for i in range(20)]
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_missing_data_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("ptqkit.zoo.fmnist.DEFAULT_DIRS", ())
    monkeypatch.delenv("PTQKIT_DATA_DIR", raising=False)
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        find_data_dir(tmp_path)


def test_truncated_file_is_a_clear_error(fake_fmnist: Path) -> None:
    path = fake_fmnist / "t10k-images-idx3-ubyte.gz"
    data = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        load_split("test", fake_fmnist)


def test_calibration_indices_balanced_and_seeded() -> None:
    labels = torch.arange(1000) % 10
    idx = calibration_indices(labels, per_class=7, seed=3)
    assert idx.numel() == 70 and torch.bincount(labels[idx]).tolist() == [7] * 10
    assert torch.equal(idx, calibration_indices(labels, per_class=7, seed=3))
    assert not torch.equal(idx, calibration_indices(labels, per_class=7, seed=4))


def test_calibration_from_train_split_only(fake_fmnist: Path) -> None:
    data = fmnist_calibration(15, seed=0, data_dir=fake_fmnist, batch_size=10)
    assert data.num_samples == 15 and not data.has_labels


def test_model_shapes_and_names() -> None:
    for factory, n_params in ((resnet20, 272186), (mobilenetv2, 590122)):
        m = factory().eval()
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert sum(p.numel() for p in m.parameters()) == n_params
    keys = set(mobilenetv2().state_dict())
    assert "features.0.0.weight" in keys and "classifier.1.weight" in keys  # torchvision names
    assert "layer1.0.conv1.weight" in set(resnet20().state_dict())


def test_unknown_zoo_model() -> None:
    with pytest.raises(ValueError, match="unknown zoo model"):
        load_model("resnet999")


@pytest.mark.data
def test_pretrained_resnet20_on_real_test_split() -> None:
    try:
        x, y = fmnist_test()
    except DatasetMissingError:
        pytest.skip("Fashion-MNIST not installed")
    assert x.shape == (10000, 1, 28, 28)
    model = load_model("fmnist-resnet20")
    with torch.no_grad():
        acc = float((model(x[:2000]).argmax(1) == y[:2000]).float().mean())
    assert acc > 0.88  # trained weights are loaded (random init scores ~0.1)
