"""Activation cache for one layer at a time: in memory up to a budget, spilled to disk above it.

Layer-wise methods (AdaQuant) need a layer's inputs and float targets for the whole calibration
set, for one layer at a time. Caching every layer at once would need memory for the whole network's
activations; this cache holds a single layer's tensors and writes chunks that do
not fit in ``budget_bytes`` to a temporary directory, removed on ``close()`` / context exit.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

__all__ = ["ActivationCache"]

log = logging.getLogger(__name__)

Item = tuple[torch.Tensor, ...]


def _nbytes(item: Item) -> int:
    return sum(t.numel() * t.element_size() for t in item)


class ActivationCache(Sequence[Item]):
    """A list of tuples of tensors (e.g. ``(x_in, y_target)`` per calibration batch).

    Items are kept in memory while the total stays under ``budget_bytes``; later items are saved
    to ``spill_dir`` (a fresh temporary directory by default) and loaded back on access.
    Use as a context manager, or call ``close()``, to delete spilled files.
    """

    def __init__(self, budget_bytes: int = 1 << 30, spill_dir: str | Path | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._parent = Path(spill_dir) if spill_dir is not None else None
        self._dir: Path | None = None
        self._items: list[Item | Path] = []
        self._counts: list[int] = []
        self.memory_bytes = 0
        self.disk_bytes = 0

    def append(self, *tensors: torch.Tensor) -> None:
        item = tuple(t.detach().contiguous() for t in tensors)
        size = _nbytes(item)
        self._counts.append(int(item[0].shape[0]) if item and item[0].dim() else 1)
        if self.memory_bytes + size <= self.budget_bytes:
            self._items.append(item)
            self.memory_bytes += size
            return
        path = self._spill_dir() / f"{len(self._items):06d}.pt"
        torch.save(item, path)
        self._items.append(path)
        self.disk_bytes += size

    def _spill_dir(self) -> Path:
        if self._dir is None:
            if self._parent is not None:
                self._parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="ptqkit-cache-", dir=self._parent))
            log.info("activation cache over budget (%d bytes): spilling to %s",
                     self.budget_bytes, self._dir)
        return self._dir

    @property
    def spilled(self) -> bool:
        return self.disk_bytes > 0

    @property
    def num_samples(self) -> int:
        """Leading-dimension total of the first tensor of every item."""
        return sum(self._counts)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Item:  # type: ignore[override]
        item = self._items[index]
        if isinstance(item, Path):
            return tuple(torch.load(item, weights_only=True))
        return item

    def __iter__(self) -> Iterator[Item]:
        for i in range(len(self)):
            yield self[i]

    def close(self) -> None:
        """Drop every item and delete spilled files."""
        self._items.clear()
        self._counts.clear()
        self.memory_bytes = self.disk_bytes = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
