"""Model quality: top-1, agreement with the float model, KL to float logits, per-layer SQNR."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calib.capture import record_io
from .calib.data import CalibrationData
from .calib.loss import calibration_loss, sqnr_db
from .nn.control import quantizers_disabled
from .nn.modules import quant_layers

__all__ = ["predict", "evaluate", "top5_agreement", "binomial_se",
           "layer_sqnr", "float_layer_outputs", "top1", "compression_ratio"]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 16,
            desc: str | None = None) -> torch.Tensor:
    """Logits of ``model`` on inputs ``x`` (N, ...), computed in batches -> (N, classes)."""
    model.eval()
    chunks = x.split(batch_size)
    bar = tqdm(chunks, desc=desc, leave=False, disable=desc is None or None)
    return torch.cat([model(c) for c in bar])


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((logits.argmax(1) == labels).float().mean())


def top5_agreement(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Percent of samples whose float top-1 class is among the quantized model's top 5.
    ref, out: (N, classes) logits."""
    hit = (out.topk(5, dim=1).indices == ref.argmax(1, keepdim=True)).any(1)
    return 100.0 * float(hit.float().mean())


def binomial_se(percent: float, n: int) -> float:
    """Standard error, in points, of a proportion measured in percent on n samples:
    100 sqrt(p (1 - p) / n)."""
    p = percent / 100.0
    return 100.0 * (p * (1.0 - p) / max(n, 1)) ** 0.5


def evaluate(qmodel: nn.Module, float_model: nn.Module, x: torch.Tensor,
             y: torch.Tensor | None = None, float_logits: torch.Tensor | None = None,
             batch_size: int = 16) -> dict[str, Any]:
    """Compare a quantized model with its float model on (x, y).

    Returns top1 / fp32_top1 (percent, when labels are given), agreement (percent of samples
    where the top-1 predictions agree) and kl (mean KL(float || quant) of the softmax outputs).
    """
    ref = float_logits if float_logits is not None else predict(float_model, x, batch_size)
    out = predict(qmodel, x, batch_size, desc="evaluate")
    res: dict[str, Any] = {
        "agreement": 100.0 * float((out.argmax(1) == ref.argmax(1)).float().mean()),
        "kl": calibration_loss([ref], [out]),
    }
    if out.dim() == 2 and out.shape[1] > 5:
        res["top5_agreement"] = top5_agreement(ref, out)
        res["agreement_se"] = binomial_se(res["agreement"], out.shape[0])
    if y is not None:
        res["top1"], res["fp32_top1"] = top1(out, y), top1(ref, y)
    return res


@torch.no_grad()
def float_layer_outputs(qmodel: nn.Module, calib: CalibrationData,
                        batches: int = 1) -> dict[str, torch.Tensor]:
    """Every quantized layer's output with all quantizers off, on the first ``batches`` batches.

    Record this before steps that change the float weights (AdaQuant, BN tuning, bias tuning,
    bias correction) to keep the original float model as the SQNR reference."""
    layers = quant_layers(qmodel)
    with quantizers_disabled(qmodel), record_io(layers, inputs=False, outputs=True) as f_out:
        for b in list(calib)[:batches]:
            calib.forward(qmodel, b)
    return {n: torch.cat(f_out[n + ":out"]) for n in layers if n + ":out" in f_out}


def layer_sqnr(qmodel: nn.Module, calib: CalibrationData, batches: int = 1,
               reference: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """SQNR (dB) of every quantized layer's output in the quantized model vs the float model,
    both fed the same model inputs (errors of earlier layers accumulate, as in deployment).

    ``reference``: the float outputs from :func:`float_layer_outputs` taken on the same batches
    before the weights were adapted; default: the current weights with quantizers off."""
    layers = quant_layers(qmodel)
    with record_io(layers, inputs=False, outputs=True) as q_out:
        for b in list(calib)[:batches]:
            calib.forward(qmodel, b)
    ref = reference if reference is not None else float_layer_outputs(qmodel, calib, batches)
    return {n: sqnr_db(ref[n], torch.cat(q_out[n + ":out"]))
            for n in layers if n + ":out" in q_out and n in ref}


def compression_ratio(qmodel: nn.Module) -> float:
    """sum(params x bits) / (all params x 32): quantized weights at their bit width, everything
    else (biases, unquantized layers, norms) at 32 bits. All-8-bit weights give ~0.25."""
    layers = quant_layers(qmodel)
    qweights = {id(m.weight): m.w_quant.storage_bits for m in layers.values() if m.w_quant.active}
    bits, total = 0.0, 0
    for name, p in qmodel.named_parameters():
        if name.endswith(("w_quant.scale", "w_quant.zero_point", "a_quant.scale", "a_quant.zero_point")):
            continue  # quantization parameters are metadata, not model weights
        bits += p.numel() * qweights.get(id(p), 32)
        total += p.numel() * 32
    return bits / total
