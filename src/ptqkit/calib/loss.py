"""Calibration losses: label-free KL to the float logits, or cross-entropy with labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kl_to_float", "sqnr_db"]


def kl_to_float(float_logits: torch.Tensor, quant_logits: torch.Tensor) -> torch.Tensor:
    """Mean over samples of KL(softmax(float) || softmax(quant)); logits (N, classes) or (N, ..., K).
    """
    f = float_logits.reshape(-1, float_logits.shape[-1]).float()
    q = quant_logits.reshape(-1, quant_logits.shape[-1]).float()
    return F.kl_div(F.log_softmax(q, -1), F.log_softmax(f, -1), log_target=True,
                    reduction="batchmean")


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(||ref||^2 / ||ref - test||^2) in dB."""
    noise = (reference.float() - test.float()).pow(2).sum()
    signal = reference.float().pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))
