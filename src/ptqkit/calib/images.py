"""Calibration inputs from a folder of image files, with a named preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

__all__ = ["PREPROCESS", "load_image_folder"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
# name -> (resize of the shorter side, centre crop, mean, std); inputs are RGB in [0, 1]
PREPROCESS: dict[str, tuple[int, int, tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": (256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _prepare(path: Path, resize: int, crop: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB")
    scale = resize / min(img.size)
    img = img.resize((max(crop, round(img.size[0] * scale)), max(crop, round(img.size[1] * scale))),
                     Image.Resampling.BILINEAR)
    left, top = (img.size[0] - crop) // 2, (img.size[1] - crop) // 2
    return np.asarray(img.crop((left, top, left + crop, top + crop)))


def load_image_folder(folder: str | Path, preprocess: str, limit: int | None = None) -> torch.Tensor:
    """Images under ``folder`` (recursively, sorted by path) -> float32 (N, 3, crop, crop).

    ``preprocess`` names the model's input transform (``PREPROCESS``): resize the shorter side,
    centre-crop, x = (rgb / 255 - mean) / std. ``limit`` keeps the first N files."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"unknown preprocessing {preprocess!r}; expected one of {', '.join(PREPROCESS)}")
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    resize, crop, mean, std = PREPROCESS[preprocess]
    x = torch.from_numpy(np.stack([_prepare(f, resize, crop) for f in files])).permute(0, 3, 1, 2)
    m, s = torch.tensor(mean).reshape(1, 3, 1, 1), torch.tensor(std).reshape(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s
