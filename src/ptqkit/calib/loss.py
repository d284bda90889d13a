"""Calibration losses: label-free KL to the float logits, or cross-entropy with labels.

:func:`calibration_loss` is the one calibration loss of every step and of the sweep (the number
range searches, AdaQuant's start, LAPQ, the sensitivity table, the guards and the sweep compare).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

__all__ = ["kl_to_float", "calibration_loss", "sqnr_db"]


def kl_to_float(float_logits: torch.Tensor, quant_logits: torch.Tensor) -> torch.Tensor:
    """Mean over samples of KL(softmax(float) || softmax(quant)); logits (N, classes) or (N, ..., K).
    """
    f = float_logits.reshape(-1, float_logits.shape[-1]).float()
    q = quant_logits.reshape(-1, quant_logits.shape[-1]).float()
    return F.kl_div(F.log_softmax(q, -1), F.log_softmax(f, -1), log_target=True,
                    reduction="batchmean")


def _rows(logits: torch.Tensor) -> int:
    return logits.reshape(-1, logits.shape[-1]).shape[0]


def calibration_loss(float_outputs: Iterable[torch.Tensor], outputs: Iterable[torch.Tensor],
                     labels: Iterable[torch.Tensor | None] | None = None) -> float:
    """The calibration loss of a model's outputs against the float model's, over all batches:

        L = (1 / R) * sum_b sum_{r in rows(b)} l_r,   R = sum_b |rows(b)|

    A row r is one position of the leading dimensions of a batch's logits (N, ..., K): a sample,
    or a sample's token. Without labels l_r = KL(softmax(f_r) || softmax(q_r)); with labels
    l_r = CE(q_r, y_r) - CE(f_r, y_r), the cross-entropy relative to the float model's, so
    both are 0 for the float model itself.

    float_outputs[b], outputs[b]: logits (N_b, ..., K) of batch b (zipped, the shorter ends);
    labels[b]: class indices (N_b, ...) of batch b, or None for the KL. Returns a float (0.0
    for no rows).
    """
    label_list = None if labels is None else list(labels)
    total, count = 0.0, 0
    for b, (f, q) in enumerate(zip(float_outputs, outputs)):
        n = _rows(q)
        if label_list is None:
            loss = kl_to_float(f, q)
        else:
            y = label_list[b] if b < len(label_list) else None
            if y is None:
                raise ValueError(f"calibration batch {b} has no labels; the cross-entropy loss "
                                 "needs (inputs, labels) batches, or use the KL ('kl')")
            y = y.reshape(-1)
            loss = (F.cross_entropy(q.reshape(n, -1).float(), y)
                    - F.cross_entropy(f.reshape(n, -1).float(), y))
        total += float(loss) * n
        count += n
    return total / max(count, 1)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(||ref||^2 / ||ref - test||^2) in dB."""
    noise = (reference.float() - test.float()).pow(2).sum()
    signal = reference.float().pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))
