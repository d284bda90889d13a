"""`ptqkit quantize package.module:factory(args)` and `--calib FOLDER --preprocess imagenet`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ptqkit.calib.images import load_image_folder
from ptqkit.cli import main
from ptqkit.runs import _parse_factory

PKG = """
import torch
from torch import nn

def make(width, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))
"""


def _images(folder: Path, n: int) -> None:
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_factory_specs_parse() -> None:
    assert _parse_factory("pkg.mod:make") == ("pkg.mod", "make", (), {})
    assert _parse_factory("a/b.py:Net.build(4, k='x')") == ("a/b.py", "Net.build", (4,), {"k": "x"})
    with pytest.raises(ValueError, match="literal"):
        _parse_factory("pkg:make(open('x'))")


def test_image_folder_is_resized_cropped_and_normalised(tmp_path: Path) -> None:
    _images(tmp_path / "imgs", 3)
    x = load_image_folder(tmp_path / "imgs", "imagenet")
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
    assert -2.2 < float(x.min()) and float(x.max()) < 2.7
    with pytest.raises(ValueError, match="no image files"):
        load_image_folder(tmp_path, "imagenet", limit=0)


def test_quantize_installed_package_factory_with_image_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "nets.py").write_text(PKG)
    monkeypatch.syspath_prepend(str(tmp_path))
    _images(tmp_path / "imgs", 4)
    rc = main(["quantize", "userpkg.nets:make(6, classes=5)", "--calib", str(tmp_path / "imgs"),
               "--preprocess", "imagenet", "--w-bits", "8", "--a-bits", "8", "--out", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "quantized.pt").is_file()
    sys.modules.pop("userpkg.nets", None)


def test_image_folder_without_preprocess_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    _images(tmp_path / "imgs", 2)
    (tmp_path / "m.py").write_text(PKG)
    assert main(["quantize", f"{tmp_path / 'm.py'}:make(4)", "--calib", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--preprocess" in err and "\n" not in err
