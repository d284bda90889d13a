"""Calibration data: any batch format in, model outputs out."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

__all__ = ["CalibrationData", "default_forward", "batch_size_of", "token_mask_of", "real_tokens",
           "check_finite"]

Batch = Any


def token_mask_of(batch: Batch) -> torch.Tensor | None:
    """The (N, T) attention mask of a Hugging Face style batch (a mapping with 'attention_mask'),
    else None (images, plain tensors: every position is real)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of a token-major activation x (N, T, ...) at real (unpadded) positions, as
    (n_real, ...); x unchanged when there is no mask or x is not laid out as (N, T, ...)."""
    if mask is None or x.dim() < 2 or tuple(x.shape[:2]) != tuple(mask.shape):
        return x
    return x[mask.to(torch.bool)]


def default_forward(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Tensor -> model(t); (x, y, ...) -> model(x); mapping -> model(**mapping) (Hugging Face style,
    e.g. a tokenizer's BatchEncoding, which is a Mapping but not a dict)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    raise TypeError(f"cannot feed a batch of type {type(batch).__name__} to the model; "
                    "pass a Tensor, an (inputs, labels) pair, a dict, or a forward_fn")


def batch_size_of(batch: Batch) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (tuple, list)) and batch:
        return batch_size_of(batch[0])
    raise TypeError(f"cannot find the batch size of a {type(batch).__name__}")


def _slice(batch: Batch, n: int) -> Batch:
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        return {k: _slice(v, n) for k, v in batch.items()}
    return type(batch)(_slice(b, n) for b in batch)


def _tensors(batch: Batch, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(where in the batch, tensor) of every tensor of a batch: '' for a tensor batch,
    " element 0" for tuples and lists, " 'key'" for mappings (nested: both)."""
    if isinstance(batch, torch.Tensor):
        yield where, batch
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from _tensors(value, f"{where} {key!r}")
    elif isinstance(batch, (tuple, list)):
        for i, value in enumerate(batch):
            yield from _tensors(value, f"{where} element {i}")


def check_finite(batch: Batch, index: int) -> None:
    """Raise a one-line ValueError naming batch ``index``, the sample (position along the first
    dimension) and the batch entry when a floating-point tensor of ``batch`` holds NaN or Inf."""
    for where, t in _tensors(batch):
        if not (t.is_floating_point() or t.is_complex()):
            continue
        bad = ~torch.isfinite(t)
        if not bool(bad.any()):
            continue
        kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        rows = bad.reshape(t.shape[0], -1).any(1) if t.dim() else bad.reshape(1)
        sample = int(rows.nonzero()[0, 0])
        entry = f" (batch entry{where})" if where else ""
        raise ValueError(f"calibration batch {index}, sample {sample}{entry} holds {kind} "
                         "values; calibration inputs must be finite: clean or drop that sample")


class CalibrationData:
    """A small, materialised calibration set that can be iterated many times.

    source: a DataLoader or any iterable of batches, or a single Tensor of inputs (split into
    ``batch_size`` chunks). limit: number of samples kept. forward_fn(model, batch) -> output
    overrides how a batch is fed to the model. Labels are ``batch[1]`` of tuple batches, if any.
    Every floating-point tensor of a kept batch must be finite: NaN or Inf raises a ValueError
    naming the batch and the sample.
    """

    forward_fn: Callable[[nn.Module, Batch], torch.Tensor]

    def __init__(self, source: Iterable[Batch] | torch.Tensor, limit: int | None = None,
                 forward_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
                 batch_size: int = 100) -> None:
        if isinstance(source, CalibrationData):
            forward_fn = forward_fn or source.forward_fn
            source = source.batches
        if isinstance(source, torch.Tensor):
            source = list(source.split(batch_size))
        self.forward_fn = forward_fn or default_forward
        self.batches: list[Batch] = []
        count = 0
        for batch in source:
            n = batch_size_of(batch)
            if limit is not None and count + n > limit:
                batch, n = _slice(batch, limit - count), limit - count
            if n > 0:
                check_finite(batch, len(self.batches))
                self.batches.append(batch)
                count += n
            if limit is not None and count >= limit:
                break
        if count == 0:
            raise ValueError("the calibration set is empty: pass at least one sample")
        self.num_samples = count

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        out = self.forward_fn(model, batch)
        return out if isinstance(out, torch.Tensor) else _logits(out)

    def labels(self, batch: Batch) -> torch.Tensor | None:
        if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
            return batch[1]
        if isinstance(batch, Mapping) and isinstance(batch.get("labels"), torch.Tensor):
            return batch["labels"]
        return None

    @property
    def has_labels(self) -> bool:
        return self.labels(self.batches[0]) is not None

    def run_all(self, model: nn.Module, desc: str | None = None) -> None:
        """One forward pass over every batch (used by statistics collection); a progress bar
        named ``desc`` is shown on a terminal."""
        with torch.no_grad():
            for batch in tqdm(self.batches, desc=desc, leave=False, disable=None):
                self.forward(model, batch)


def _logits(out: Any) -> torch.Tensor:
    """Pick the main tensor out of a model output (HF ModelOutput, tuple, dict)."""
    for key in ("logits", "last_hidden_state"):
        if hasattr(out, key):
            return getattr(out, key)
        if isinstance(out, Mapping) and key in out:
            return out[key]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; pass a forward_fn that returns a Tensor")
