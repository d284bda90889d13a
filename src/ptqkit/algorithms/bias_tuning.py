"""Bias tuning (Hubara et al., section 3.3): knowledge distillation with only the biases trainable.

Loss: KL(softmax(float logits) || softmax(quantized logits)), label-free, with the float teacher's
logits recorded per calibration sample (CalibTIP keys them by class label, which breaks with more
than one image per class). The biases of the quantized layers are the only trainable tensors.
Part of the calibration set is held out; the bias vector with the lowest held-out KL (the start
included) is kept, so the result is never worse than the start on the held-out part.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib.data import CalibrationData
from ..calib.loss import calibration_loss, kl_to_float
from ..nn.modules import quant_layers
from .base import Context, Step, register_step

__all__ = ["BiasTuningOptions", "split_holdout", "tune_biases", "BiasTuning"]


@dataclass(frozen=True)
class BiasTuningOptions:
    """iters: Adam steps (one calibration batch each); lr: Adam learning rate on the biases (real
    units); holdout: fraction of calibration batches held out to pick the best iterate;
    eval_every: steps between held-out evaluations."""

    iters: int = 100
    lr: float = 1e-3
    holdout: float = 0.1
    eval_every: int = 10

    def __post_init__(self) -> None:
        if self.iters < 0 or self.eval_every < 1:
            raise ValueError(f"iters must be >= 0 and eval_every >= 1, got {self.iters}, "
                             f"{self.eval_every}")
        if self.lr < 0:
            raise ValueError(f"lr must be >= 0, got {self.lr}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be a fraction in (0, 1), got {self.holdout}")


def split_holdout(num_batches: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, held-out) batch indices: the last ceil-ish ``fraction`` of the batches are held out.
    With a single batch there is nothing to hold out: both lists are [0]."""
    if num_batches < 2:
        return [0], [0]
    held = min(num_batches - 1, max(1, round(fraction * num_batches)))
    return list(range(num_batches - held)), list(range(num_batches - held, num_batches))


@contextmanager
def _only_trainable(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """requires_grad only on ``params`` inside the block; the previous flags come back on exit."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    keep = {id(p) for p in params}
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@torch.no_grad()
def _kl(model: nn.Module, calib: CalibrationData, teacher: Sequence[torch.Tensor],
        idx: Sequence[int]) -> float:
    """The calibration loss (KL to the teacher) over the batches ``idx``."""
    return calibration_loss([teacher[i] for i in idx],
                            (calib.forward(model, calib.batches[i]) for i in idx))


def tune_biases(model: nn.Module, calib: CalibrationData, teacher: Sequence[torch.Tensor],
                opts: BiasTuningOptions, generator: torch.Generator | None = None) -> dict[str, Any]:
    """Adam on the biases of the quantized layers, minimising KL(teacher || model) per sample.

    teacher[i]: float logits (N_i, ..., K) of calibration batch i. Keeps the best iterate on the
    held-out batches. Returns {kl_before, kl_after (held out), best_iter, held_out}.
    """
    gen = generator or torch.Generator().manual_seed(0)
    biases = [m.ensure_bias() for m in quant_layers(model).values()]
    train, held = split_holdout(len(calib), opts.holdout)
    best_kl = before = _kl(model, calib, teacher, held)
    best, best_iter = [b.detach().clone() for b in biases], 0
    with _only_trainable(model, biases), torch.enable_grad():
        opt = torch.optim.Adam(biases, lr=opts.lr)
        for it in tqdm(range(1, opts.iters + 1), desc="bias tuning", disable=None):
            i = train[int(torch.randint(len(train), (1,), generator=gen))]
            loss = kl_to_float(teacher[i], calib.forward(model, calib.batches[i]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if it % opts.eval_every == 0 or it == opts.iters:
                kl = _kl(model, calib, teacher, held)
                if kl < best_kl:
                    best_kl, best, best_iter = kl, [b.detach().clone() for b in biases], it
    with torch.no_grad():
        for b, v in zip(biases, best):
            b.copy_(v)
    return {"kl_before": before, "kl_after": best_kl, "best_iter": best_iter,
            "held_out": held != train}


@register_step
class BiasTuning(Step[BiasTuningOptions]):
    """Bias tuning by KL distillation from the float model (teacher logits from ``ctx``)."""

    name = "bias_tuning"
    Options = BiasTuningOptions
    effects = frozenset({"changes_weights"})

    def run(self, ctx: Context) -> dict[str, Any]:
        teacher = ctx.float_outputs()
        gen = torch.Generator().manual_seed(ctx.seed)
        summary = tune_biases(ctx.qmodel, ctx.calib, teacher, self.options, gen)
        if not summary["held_out"]:
            ctx.report.notes.append("bias tuning: a single calibration batch, so the best iterate "
                                    "was chosen on the training batch itself (nothing held out)")
        return {**summary, "iters": self.options.iters}
