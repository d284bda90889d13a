"""Fashion-MNIST from the standard IDX files (no torchvision).

Looks in the given directory, then ``$PTQKIT_DATA_DIR``, then ``/usr/share/datasets/fashion-mnist``
(the Debian package ``dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["MEAN", "STD", "DatasetMissingError", "find_data_dir", "load_split", "calibration_indices"]

MEAN, STD = 0.2860, 0.3530
DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four "
    "IDX files (train/t10k images and labels, .gz or raw) in a folder and pass --data-dir"
)


class DatasetMissingError(FileNotFoundError):
    """Raised when the Fashion-MNIST IDX files cannot be found."""


def _candidates(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    dirs = [data_dir, os.environ.get("PTQKIT_DATA_DIR"), *DEFAULT_DIRS]
    return [Path(d) for d in dirs if d]


def _resolve(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def find_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the first folder holding all four IDX files, or raise DatasetMissingError."""
    tried = _candidates(data_dir)
    for folder in tried:
        if all(_resolve(folder, s) for pair in _FILES.values() for s in pair):
            return folder
    looked = ", ".join(str(p) for p in tried)
    raise DatasetMissingError(f"Fashion-MNIST not found (looked in {looked}); {INSTALL_HINT}")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:  # type: ignore[operator]
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: expected {int(np.prod(dims))} bytes, found {body.size}")
    return body.reshape(dims)


def load_split(split: str, data_dir: str | os.PathLike[str] | None = None,
               normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float (N, 1, 28, 28) (normalised with MEAN/STD unless ``normalize=False``) and
    int64 labels (N,)."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_data_dir(data_dir)
    img_stem, lbl_stem = _FILES[split]
    images = _read_idx(_resolve(folder, img_stem))  # type: ignore[arg-type]
    labels = _read_idx(_resolve(folder, lbl_stem))  # type: ignore[arg-type]
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    if normalize:
        x = (x - MEAN) / STD
    return x, torch.from_numpy(labels.astype(np.int64))


def calibration_indices(labels: torch.Tensor, per_class: int = 100, seed: int = 0) -> torch.Tensor:
    """Balanced calibration subset: ``per_class`` indices per class, drawn with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        picks.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
    out = torch.cat(picks)
    return out[torch.randperm(out.numel(), generator=g)]
