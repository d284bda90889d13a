"""Peer toolkits as benchmark runners: NNCF and Brevitas, measured on the same calibration data.

Each runner is ``fn(suite, cfg) -> row`` (see ``bench.RUNNERS``); the peer is imported lazily, so
importing this module needs neither. A peer that cannot run returns a row with ``error`` (one
line) and no quantized metrics; it never raises through the bench.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import nn

__all__ = ["PEER_RUNNERS", "nncf_row", "brevitas_row"]

log = logging.getLogger(__name__)


def _inputs(suite: Any, cfg: Any) -> list[torch.Tensor]:
    calib = suite.calib(cfg.calib_size, cfg.seed)
    return [b if isinstance(b, torch.Tensor) else b[0] for b in calib.batches]


def _metrics(suite: Any, model: nn.Module, seconds: float) -> dict[str, Any]:
    res = suite.evaluate(model)
    top, ref = res.get("top1"), res.get("fp32_top1")
    extra = {k: v for k, v in res.items() if k not in ("top1", "fp32_top1", "agreement", "kl")}
    return {"fp32_top1": ref, "quant_top1": top, "delta": None if top is None else top - ref,
            "agreement": res["agreement"], "kl": res["kl"], "seconds": seconds, **extra}


def _guarded(tool: str, fn: Callable[[Any, Any], dict[str, Any]]) -> Callable[[Any, Any], dict[str, Any]]:
    def run(suite: Any, cfg: Any) -> dict[str, Any]:
        try:
            tool_version = version(tool)
        except PackageNotFoundError:
            return {"error": f"{tool} is not installed (pip install 'ptqkit[peers]')",
                    "quant_top1": None, "agreement": None}
        try:
            return {"peer_version": f"{tool} {tool_version}", **fn(suite, cfg)}
        except Exception as exc:  # a peer's failure is a row, not a crash of the bench
            log.warning("%s failed", tool, exc_info=True)
            msg = f"{tool} failed: {type(exc).__name__}: {exc}".splitlines()[0][:300]
            return {"error": msg, "quant_top1": None, "agreement": None,
                    "peer_version": f"{tool} {tool_version}"}
    return run


def nncf_row(suite: Any, cfg: Any) -> dict[str, Any]:
    """``nncf.quantize`` with its defaults (8-bit weights and activations, all layers)."""
    if cfg.w_bits != 8 or cfg.a_bits != 8:
        return {"error": f"NNCF's post-training quantize has no W{cfg.w_bits}A{cfg.a_bits} setting "
                         "for CNNs (8-bit only)", "quant_top1": None, "agreement": None}
    import nncf

    items = _inputs(suite, cfg)
    t0 = time.perf_counter()
    qmodel = nncf.quantize(copy.deepcopy(suite.float_model).eval(), nncf.Dataset(items),
                           subset_size=sum(len(x) for x in items))
    seconds = time.perf_counter() - t0
    return {**_metrics(suite, qmodel.eval(), seconds),
            "recipe": {"tool": "nncf.quantize", "preset": "default (performance: symmetric)",
                       "subset_size": sum(len(x) for x in items), "first_last_8bit": "n/a (all 8-bit)",
                       "weights": "int8 per-channel", "activations": "int8 per-tensor"}}


def brevitas_row(suite: Any, cfg: Any) -> dict[str, Any]:
    """Brevitas' ImageNet PTQ recipe (ptq_common): graph equalization, per-channel weights,
    percentile activation calibration, bias correction; first/last layers at 8 bits when asked."""
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq import ptq_common as pc

    settings: dict[str, Any] = {
        "backend": "layerwise", "weight_bit_width": cfg.w_bits, "act_bit_width": cfg.a_bits,
        "bias_bit_width": 32, "weight_quant_granularity": "per_channel",
        "act_quant_percentile": 99.999, "act_quant_type": "sym", "scale_factor_type": "float_scale",
        "quant_format": "int",
        "layerwise_first_last_bit_width": 8 if cfg.first_last_8bit else cfg.w_bits}
    loader = [(x, torch.zeros(len(x))) for x in _inputs(suite, cfg)]
    t0 = time.perf_counter()
    model = preprocess_for_quantize(copy.deepcopy(suite.float_model).eval(), equalize_iters=20,
                                    equalize_merge_bias=True, merge_bn=True)
    qmodel = pc.quantize_model(model, **settings)
    pc.calibrate(loader, qmodel)
    pc.apply_bias_correction(loader, qmodel)
    seconds = time.perf_counter() - t0
    return {**_metrics(suite, qmodel.eval(), seconds),
            "recipe": {"tool": "brevitas ptq_common", "equalize_iters": 20, "merge_bn": True,
                       "bias_correction": True, **settings}}


PEER_RUNNERS: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
    "nncf": _guarded("nncf", nncf_row),
    "brevitas": _guarded("brevitas", brevitas_row),
}
