"""EfficientNet-Lite0 and the composite photographs (needs the vision extras and Debian photos)."""

from __future__ import annotations

import pytest
import torch

imagenet = pytest.importorskip("ptqkit.zoo.imagenet")
pytestmark = pytest.mark.vision
if not imagenet.STAMPS_DIR.is_dir() or not imagenet.WALLPAPERS_DIR.is_dir():
    pytest.skip("Debian photo packages not installed (make data)", allow_module_level=True)


def test_object_halves_are_disjoint_and_photographic() -> None:
    calib, ev = imagenet.object_files("calib"), imagenet.object_files("eval")
    assert len(calib) > 100 and len(ev) > 100
    assert not set(calib) & set(ev)
    assert not any(set(p.parts) & imagenet.SKIP_FOLDERS for p in calib + ev)
    with pytest.raises(ValueError, match="'calib' or 'eval'"):
        imagenet.object_files("test")


def test_composites_are_deterministic_and_cached(tmp_path, monkeypatch) -> None:
    a = imagenet.composite_images(3, "eval", 7)
    assert a.shape == (3, 3, 224, 224) and a.dtype == torch.uint8
    torch.testing.assert_close(a, imagenet.composite_images(3, "eval", 7), rtol=0, atol=0)
    assert not torch.equal(a, imagenet.composite_images(3, "eval", 8))
    monkeypatch.setenv("PTQKIT_CACHE", str(tmp_path))
    first = imagenet.imagenet_images(2, "calib", 0)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    monkeypatch.setattr(imagenet, "composite_images", lambda *a: pytest.fail("rebuilt"))
    torch.testing.assert_close(imagenet.imagenet_images(2, "calib", 0), first, rtol=0, atol=0)
    x = imagenet.normalize(first)
    assert x.dtype == torch.float32 and abs(float(x.mean())) < 3


def test_model_recognises_a_tiger() -> None:
    from PIL import Image

    path = next(p for p in imagenet.STAMPS_DIR.rglob("tiger.png"))
    img = Image.open(path).convert("RGBA")
    canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
    canvas.alpha_composite(img)
    x = torch.from_numpy(__import__("numpy").asarray(canvas.convert("RGB").resize((224, 224))).copy())
    model = imagenet.efficientnet_lite0()
    with torch.no_grad():
        logits = model(imagenet.normalize(x.permute(2, 0, 1)[None]))
    assert int(logits.argmax()) == 292  # tiger
