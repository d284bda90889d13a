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

from .nn.coverage import Coverage, MacCounter

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
    # NNCF's subset_size counts dataset items, here batches: all calibration batches are used.
    qmodel = nncf.quantize(copy.deepcopy(suite.float_model).eval(), nncf.Dataset(items),
                           subset_size=len(items))
    seconds = time.perf_counter() - t0
    return {**_metrics(suite, qmodel.eval(), seconds),
            "weight_layers_quantized": _nncf_weight_layers(suite.float_model, qmodel, items[0][:2]),
            "recipe": {"tool": "nncf.quantize", "preset": "default (performance: symmetric)",
                       "subset_size": sum(len(x) for x in items), "first_last_8bit": "n/a (all 8-bit)",
                       "weights": "int8 per-channel", "activations": "int8 per-tensor"}}


def _brevitas_coverage(float_model: nn.Module, qmodel: nn.Module, x: torch.Tensor) -> Coverage:
    """MAC coverage of a Brevitas model: MACs of its quantized weight layers (``QuantWBIOL``
    modules, ``out.numel() * weight[0].numel()`` each) over all conv/linear MACs of the float
    model on the same batch ``x`` (counted by :class:`~ptqkit.nn.coverage.MacCounter`)."""
    from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer as QuantWBIOL

    ref = copy.deepcopy(float_model).eval()
    with torch.no_grad(), MacCounter(ref) as counter:
        ref(x)
    total = sum(counter.macs.values()) + counter.matmul_macs
    quantized: dict[str, int] = {}
    handles = [mod.register_forward_hook(
        lambda m, a, out, n=name: quantized.__setitem__(n, int(out.numel()) * int(m.weight[0].numel())))
        for name, mod in qmodel.named_modules() if isinstance(mod, QuantWBIOL)]
    try:
        with torch.no_grad():
            qmodel(x)
    finally:
        for h in handles:
            h.remove()
    done = min(sum(quantized.values()), total)
    return Coverage(done / total if total else 1.0, done, total,
                    [("torch.nn.functional calls after Brevitas' fx trace", total - done,
                      "a conv/linear subclass with its own forward is traced into a functional call, "
                      "which Brevitas' layerwise backend does not quantize")] if done < total else [])


def _nncf_weight_layers(float_model: nn.Module, qmodel: nn.Module, x: torch.Tensor) -> str:
    """``"q/n"``: NNCF weight quantizers (pre-hooks on input port 1 of a conv/linear call) over
    the conv/linear calls of the float model on ``x``."""
    ref = copy.deepcopy(float_model).eval()
    with torch.no_grad(), MacCounter(ref) as counter:
        ref(x)
    hooks = [getattr(store, "pre_hooks", {}) for store in qmodel.modules()
             if type(store).__name__ == "HookStorage"]
    weighted = [key for table in hooks for key in table if key.endswith("__1")
                and ("/conv" in key or "/linear" in key)]
    return f"{len(weighted)}/{len(counter.macs)}"


def brevitas_row(suite: Any, cfg: Any) -> dict[str, Any]:
    """Brevitas' ImageNet PTQ recipe (ptq_common): graph equalization, per-channel weights,
    percentile activation calibration, bias correction; first/last layers at 8 bits when asked.

    ``relu6_to_relu`` is off: Brevitas' default replaces ReLU6 by ReLU, which changes a model
    trained with ReLU6 (EfficientNet-Lite, MobileNet) before any quantization. The row carries
    the MAC coverage; under ``MIN_COVERAGE`` it is refused like a ptqkit row."""
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq import ptq_common as pc

    from .bench import MIN_COVERAGE

    settings: dict[str, Any] = {
        "backend": "layerwise", "weight_bit_width": cfg.w_bits, "act_bit_width": cfg.a_bits,
        "bias_bit_width": 32, "weight_quant_granularity": "per_channel",
        "act_quant_percentile": 99.999, "act_quant_type": "sym", "scale_factor_type": "float_scale",
        "quant_format": "int",
        "layerwise_first_last_bit_width": 8 if cfg.first_last_8bit else cfg.w_bits}
    loader = [(x, torch.zeros(len(x))) for x in _inputs(suite, cfg)]
    t0 = time.perf_counter()
    model = preprocess_for_quantize(copy.deepcopy(suite.float_model).eval(), equalize_iters=20,
                                    equalize_merge_bias=True, merge_bn=True, relu6_to_relu=False)
    qmodel = pc.quantize_model(model, **settings)
    pc.calibrate(loader, qmodel)
    pc.apply_bias_correction(loader, qmodel)
    seconds = time.perf_counter() - t0
    cov = _brevitas_coverage(suite.float_model, qmodel.eval(), loader[0][0][:2])
    recipe = {"tool": "brevitas ptq_common", "equalize_iters": 20, "merge_bn": True,
              "relu6_to_relu": False, "bias_correction": True, **settings}
    if cov.fraction < MIN_COVERAGE and not getattr(cfg, "allow_low_coverage", False):
        return {"mac_coverage": cov.fraction, "quant_top1": None, "agreement": None,
                "seconds": seconds, "recipe": recipe,
                "error": f"refused: in Brevitas' model {cov.describe(1)} (under "
                         f"{100 * MIN_COVERAGE:.0f}%; pass --allow-low-coverage to print it)"}
    return {**_metrics(suite, qmodel.eval(), seconds), "mac_coverage": cov.fraction,
            "recipe": recipe}


PEER_RUNNERS: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
    "nncf": _guarded("nncf", nncf_row),
    "brevitas": _guarded("brevitas", brevitas_row),
}
