"""Context managers that record layer inputs/outputs, and activation statistics in one pass."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import CalibrationData, real_tokens, token_mask_of

__all__ = ["record_io", "collect_input_samples"]


@contextmanager
def record_io(modules: Mapping[str, nn.Module], inputs: bool = True,
              outputs: bool = False) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record (detached) first-argument inputs and/or outputs of the given modules.

    Yields {name: [tensor per call]} for inputs and {name + ':out': [...]} for outputs.
    Hooks are removed on exit, also on error.
    """
    store: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, mod in modules.items():
        if inputs:
            handles.append(mod.register_forward_pre_hook(
                lambda m, a, n=name: store.setdefault(n, []).append(a[0].detach())))
        if outputs:
            handles.append(mod.register_forward_hook(
                lambda m, a, o, n=name: store.setdefault(n + ":out", []).append(o.detach())))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_input_samples(model: nn.Module, modules: Mapping[str, nn.Module], data: CalibrationData,
                          max_samples: int = 1 << 20, seed: int = 0,
                          outputs: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One pass over ``data``: a random subsample of every module's input values. Padded token
    positions of text batches (attention mask 0) are left out: they are not real inputs.
    ``outputs``: when given, the model's output of each batch is appended to it.

    Returns {name: 1-D tensor} of at most ``max_samples`` + 2 values per module; the exact minimum
    and maximum seen are always included, so min-max ranges from a sample are exact.
    """
    g = torch.Generator().manual_seed(seed)
    per_batch = max(1, max_samples // max(1, len(data)))
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    handles = []
    state: dict[str, torch.Tensor | None] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def fn(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = real_tokens(args[0].detach(), state.get("mask")).reshape(-1).float()
            if x.numel() == 0:
                return
            if x.numel() > per_batch:
                idx = torch.randint(0, x.numel(), (per_batch,), generator=g)
                parts[name] += [x[idx], x.min().reshape(1), x.max().reshape(1)]
            else:
                parts[name].append(x)
        return fn

    for name, mod in modules.items():
        handles.append(mod.register_forward_pre_hook(hook(name)))
    try:
        for batch in tqdm(data.batches, desc="activation statistics", leave=False, disable=None):
            state["mask"] = token_mask_of(batch)
            out = data.forward(model, batch)
            if outputs is not None:
                outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(p) for n, p in parts.items() if p}
