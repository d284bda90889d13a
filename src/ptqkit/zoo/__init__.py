"""Built-in models and data sets: Fashion-MNIST reference networks trained by the project."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..calib.data import CalibrationData
from .fmnist import DatasetMissingError, calibration_indices, load_split
from .models import FACTORIES
from .text import MODELS as TEXT_MODELS

__all__ = ["ZOO", "load_model", "fmnist_calibration", "fmnist_test", "DatasetMissingError",
           "WEIGHTS_DIR"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
ZOO = tuple(sorted(FACTORIES))


def load_model(name: str, pretrained: bool = True) -> nn.Module:
    """A zoo model in eval mode, with the project's trained weights unless ``pretrained=False``.
    Text encoders (``minilm``, needs ptqkit[text]) always come with their published weights."""
    if name in TEXT_MODELS:
        return TEXT_MODELS[name]()
    if name not in FACTORIES:
        raise ValueError(f"unknown zoo model {name!r}; expected one of "
                         f"{', '.join(ZOO + tuple(TEXT_MODELS))}")
    model = FACTORIES[name]()
    if pretrained:
        path = WEIGHTS_DIR / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"weights for {name} not found at {path}; train them with "
                                    f"`python scripts/train_zoo.py {name}`")
        model.load_state_dict(load_file(str(path)))
    return model.eval()


def fmnist_calibration(n: int = 1000, seed: int = 0, data_dir: str | os.PathLike[str] | None = None,
                       batch_size: int = 100) -> CalibrationData:
    """Unlabeled calibration set: ``n`` train images, balanced over the 10 classes, fixed seed."""
    if n < 1:
        raise ValueError(f"the calibration set needs at least 1 image, got n={n}")
    x, y = load_split("train", data_dir)
    idx = calibration_indices(y, per_class=-(-n // 10), seed=seed)[:n]
    return CalibrationData(x[idx], batch_size=batch_size)


def fmnist_test(data_dir: str | os.PathLike[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The full 10k test split: normalised images (N, 1, 28, 28) and labels (N,)."""
    return load_split("test", data_dir)
