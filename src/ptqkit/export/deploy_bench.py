"""Deployment benchmark: ONNX Runtime latency, file size and closeness to float of float /
ptqkit / ORT-int8 models (``ptqkit bench --deploy``), and ONNX Runtime's own static quantization
as a peer method (``ort-minmax`` ...).

Latency protocol: CPU execution provider, ``threads`` intra-op threads, all graph optimisations;
per model and batch size ``warmup`` runs are discarded; then the models (float / ORT int8 / ours)
are timed round-robin, one run each per batch size and repeat, and the median of the ``repeats``
timed runs is kept (interleaving makes the ratios fair when the machine is loaded).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calib.data import CalibrationData
from .onnx import cpu_info, export_onnx, optimized_op_counts, ort_load

__all__ = ["LatencySpec", "export_float", "ort_quantize", "ort_predict", "latency_ms",
           "interleaved_latency_ms", "ORT_CALIBRATORS", "ort_peer_row", "deploy_row",
           "integer_kernels", "OrtModule", "parity", "deploy_recipe", "deploy_markdown"]

log = logging.getLogger(__name__)
ORT_CALIBRATORS = {"ort-minmax": "MinMax", "ort-entropy": "Entropy", "ort-percentile": "Percentile"}
INT_KERNELS = ("QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QLinearAdd",
               "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
               "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax")


@dataclass(frozen=True)
class LatencySpec:
    threads: int = 2
    batches: tuple[int, ...] = (1, 32)
    warmup: int = 5
    repeats: int = 30

    def __post_init__(self) -> None:
        if self.threads < 1 or self.repeats < 1 or self.warmup < 0 or not self.batches:
            raise ValueError(f"invalid LatencySpec {self}: threads, repeats >= 1, warmup >= 0, "
                             "at least one batch size")


def export_float(model: nn.Module, path: str | os.PathLike[str], example_input: torch.Tensor,
                 opset: int = 17) -> Path:
    """torch.onnx export of the float model (TorchScript exporter, dynamic batch axis)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example_input,), str(path), opset_version=opset,
                          dynamo=False, input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          do_constant_folding=True)
    return path


class _Reader:
    """onnxruntime CalibrationDataReader over a CalibrationData (tensor batches).

    It also implements ``__len__`` and ``set_range``, the protocol of ORT's ``CalibStridedMinMax``
    option, so that ``quantize_static`` can calibrate one window of batches at a time."""

    def __init__(self, calib: CalibrationData) -> None:
        self._feeds = [{"input": _as_input(b).numpy()} for b in calib]
        self.set_range(0, len(self._feeds))

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._feeds[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _as_input(batch: Any) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else batch[0]


def _first_last_weights(onnx_path: Path) -> list[str]:
    import onnx

    names = [n.input[1] for n in onnx.load(str(onnx_path)).graph.node
             if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1]
    return [names[0], names[-1]] if names else []


def ort_quantize(float_onnx: str | os.PathLike[str], out: str | os.PathLike[str],
                 calib: CalibrationData, method: str = "MinMax", w_bits: int = 8, a_bits: int = 8,
                 first_last_8bit: bool = True) -> Path:
    """ONNX Runtime's own static quantization: its pre-processing, then QDQ with per-channel
    signed weights and unsigned activations (int8/uint8, or ORT's INT4/UINT4 types at 4 bits;
    first and last weights int8 when ``first_last_8bit``), calibrated on ``calib``. On x86 CPUs
    without VNNI weights use ORT's ``reduce_range`` (7 bits), which its integer kernels there
    need to avoid saturating int16 pair sums."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    types = {8: (QuantType.QInt8, QuantType.QUInt8), 4: (QuantType.QInt4, QuantType.QUInt4)}
    if w_bits not in types or a_bits not in types:
        raise ValueError(f"ONNX Runtime quantizes to 8 or 4 bits, got W{w_bits}A{a_bits}")
    out = Path(out)
    pre = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(float_onnx), str(pre))
    # ORT's histogram calibrators hold every intermediate tensor of every batch they are given
    # before they build histograms (they ignore CalibMaxIntermediateOutputs): 1000 EfficientNet
    # images need more than 24 GB. CalibStridedMinMax=1 hands them one batch per call, and they
    # merge each batch into their histograms; MinMax flushes its running ranges every 8 batches.
    extra: dict[str, Any] = {"CalibMaxIntermediateOutputs": 8, "CalibStridedMinMax": 1}
    if first_last_8bit and w_bits != 8:
        extra["TensorQuantOverrides"] = {w: [{"quant_type": QuantType.QInt8}]
                                         for w in _first_last_weights(pre)}
    quantize_static(str(pre), str(out), _Reader(calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=types[a_bits][1],
                    weight_type=types[w_bits][0], calibrate_method=CalibrationMethod[method],
                    reduce_range=_reduce_range(cpu_info()), extra_options=extra)
    pre.unlink(missing_ok=True)
    return out


def ort_predict(path: str | os.PathLike[str], x: torch.Tensor, batch_size: int = 64,
                threads: int = 2) -> torch.Tensor:
    """Logits of the ONNX model on ``x`` (N, ...) with ONNX Runtime."""
    sess = ort_load(path, threads)
    outs = [sess.run(None, {"input": x[i:i + batch_size].numpy()})[0]
            for i in range(0, len(x), batch_size)]
    return torch.from_numpy(np.concatenate(outs))


def latency_ms(path: str | os.PathLike[str], sample: torch.Tensor, spec: LatencySpec) -> dict[str, float]:
    """Median latency (ms) per batch size of one model; ``sample`` holds >= max(batches) inputs."""
    return interleaved_latency_ms({"m": Path(path)}, sample, spec)["m"]


def interleaved_latency_ms(paths: dict[str, Path], sample: torch.Tensor,
                           spec: LatencySpec) -> dict[str, dict[str, float]]:
    """{tag: {latency_b<B>_ms: median}} with the models timed round-robin: every repeat runs each
    model once per batch size (the order rotating from repeat to repeat, so no model always runs
    right after the same other one), so a change in machine load affects all models alike.
    ``warmup`` runs per model and batch size are discarded first."""
    runners = {tag: ort_load(p, spec.threads) for tag, p in paths.items()}
    feeds = {b: {"input": sample[:b].numpy()} for b in spec.batches}
    for sess in runners.values():
        for feed in feeds.values():
            for _ in range(spec.warmup):
                sess.run(None, feed)
    times: dict[tuple[str, int], list[float]] = {(t, b): [] for t in runners for b in spec.batches}
    tags = list(runners)
    for r in range(spec.repeats):
        for b, feed in feeds.items():
            for tag in tags[r % len(tags):] + tags[:r % len(tags)]:  # rotate: no fixed position
                t0 = time.perf_counter()
                runners[tag].run(None, feed)
                times[tag, b].append(time.perf_counter() - t0)
    return {tag: {f"latency_b{b}_ms": 1000 * statistics.median(times[tag, b])
                  for b in spec.batches} for tag in runners}


def integer_kernels(path: str | os.PathLike[str]) -> dict[str, Any]:
    """How many integer kernels (QLinearConv, QGemm, QLinearAdd, ...) and float Conv/Gemm ONNX
    Runtime really runs, and the count of every op type of its optimised graph."""
    with tempfile.TemporaryDirectory() as tmp:
        ops = optimized_op_counts(path, tmp)
    float_ops = sum(v for k, v in ops.items() if k in ("Conv", "FusedConv", "Gemm", "MatMul",
                                                         "FusedGemm", "FusedMatMul"))
    return {"int_kernels": sum(ops[k] for k in INT_KERNELS), "float_kernels": float_ops,
            "ops": {k: ops[k] for k in INT_KERNELS if ops[k]}, "all_ops": dict(sorted(ops.items()))}


class OrtModule(nn.Module):
    """Wraps an ONNX Runtime inference runner as a module (so evaluate() and predict() apply)."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 2) -> None:
        super().__init__()
        self.sess = ort_load(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(None, {"input": x.detach().numpy()})[0])


def _example(suite: Any, n: int = 64) -> torch.Tensor:
    return suite.x_test[:n].contiguous()


def ort_peer_row(suite: Any, cfg: Any, method: str) -> dict[str, Any]:
    """Bench row of ONNX Runtime's own static quantization (``method`` in ORT_CALIBRATORS)."""
    calib = suite.calib(cfg.calib_size, cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        fp = export_float(suite.float_model, Path(tmp) / "float.onnx", _example(suite, 1))
        t0 = time.perf_counter()
        qp = ort_quantize(fp, Path(tmp) / "ort.onnx", calib, ORT_CALIBRATORS[method], cfg.w_bits,
                          cfg.a_bits, cfg.first_last_8bit)
        seconds = time.perf_counter() - t0
        res = suite.evaluate(OrtModule(qp))
        kernels = integer_kernels(qp)
    return {"fp32_top1": res.get("fp32_top1"), "quant_top1": res.get("top1"),
            "delta": (res["top1"] - res["fp32_top1"]) if res.get("top1") is not None else None,
            "agreement": res["agreement"], "kl": res["kl"],
            "seconds": seconds, "int_kernels": kernels["int_kernels"],
            **{k: v for k, v in res.items() if k in ("top5_agreement", "agreement_se")},
            "recipe": {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                       "per_channel": True, "weights": f"int{cfg.w_bits}",
                       "activations": f"uint{cfg.a_bits}", "first_last_8bit": cfg.first_last_8bit,
                       "calibrate_method": ORT_CALIBRATORS[method], "pre_process": True}}


def _sizes_and_latency(paths: dict[str, Path], sample: torch.Tensor,
                       spec: LatencySpec) -> dict[str, Any]:
    row: dict[str, Any] = {}
    latency = interleaved_latency_ms(paths, sample, spec)
    for tag, path in paths.items():
        row[f"{tag}_bytes"] = path.stat().st_size
        for k, v in latency[tag].items():
            row[f"{tag}_{k}"] = v
        row[f"{tag}_kernels"] = integer_kernels(path)
    for b in spec.batches:
        ours, ort_, fl = (row[f"{t}_latency_b{b}_ms"] for t in ("ours", "ort", "float"))
        row[f"speedup_vs_float_b{b}"] = fl / ours
        row[f"ours_over_ort_b{b}"] = ours / ort_
    return row


def deploy_row(suite: Any, cfg: Any, recipe: Any, spec: LatencySpec | None = None,
               workdir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Parity, closeness to float, latency and file size of float / ptqkit / ORT-int8 ONNX models
    of one suite.

    ``recipe`` quantizes the ptqkit model (exported with :func:`export_onnx`); ORT's int8 model
    is quantize_static with MinMax calibration on the same calibration images. On the suite's
    test inputs, both integer models run in ONNX Runtime and are compared with the float model
    (``ours_vs_float_*``, ``ort_vs_float_*``: top-1 agreement in percent, mean KL(float ||
    model) of the softmax; ``agreement`` / ``kl`` are ours), and ours with the simulated model
    (``onnx_vs_sim_agreement``). Latencies are interleaved medians (``spec``); the row also
    names the CPU and its VNNI flags, the export notes, ONNX file sizes and the packed
    checkpoint's size (sub-8-bit weights are stored packed there, in int8 containers in ONNX).
    """
    from ..pipeline import quantize

    spec = spec or LatencySpec()
    calib = suite.calib(cfg.calib_size, cfg.seed)
    cpu = cpu_info()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(workdir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        qmodel = quantize(suite.float_model, calib, recipe, forward_fn=suite.forward_fn)
        seconds = time.perf_counter() - t0
        paths = {"float": export_float(suite.float_model, out / "float.onnx", _example(suite, 1)),
                 "ort": ort_quantize(out / "float.onnx", out / "ort_int8.onnx", calib)}
        info = export_onnx(qmodel, out / "ptqkit.onnx", _example(suite, 1))
        paths["ours"] = info.path
        sizes = checkpoint_sizes(suite.float_model, qmodel, out)
        quality = _quality(suite, qmodel, paths, spec.threads)
        row = {"fp32_top1": suite.fp32_top1, **quality,
               "method": "deploy (" + _recipe_label(recipe) + ")", "seconds": seconds,
               "cpu": {"model": cpu["model"], "vnni": cpu["vnni"]},
               "reduce_range": _reduce_range(cpu),
               "export_notes": info.notes, "float_layers": info.float_layers,
               "weight_containers": _containers(info.layers), **sizes,
               **_sizes_and_latency(paths, _example(suite, max(spec.batches)), spec),
               "latency": {"threads": spec.threads, "warmup": spec.warmup, "repeats": spec.repeats,
                           "batches": list(spec.batches)},
               "recipe": recipe.to_dict()}
    return row


def _containers(layers: dict[str, dict[str, Any]]) -> dict[str, int]:
    """How many layers store their weights in each ONNX container, e.g. {"int8 (4-bit)": 48}."""
    out: dict[str, int] = {}
    for v in layers.values():
        key = f"{v['w_type']} ({v['w_bits']}-bit)" if v["w_type"] != "float" else "float"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def _recipe_label(recipe: Any) -> str:
    sym = {True: "sym", False: "asym", None: "auto-sym"}.get(recipe.w_symmetric, "sym")
    steps = "+".join(s.name for s in recipe.steps) or "no steps"
    return f"{recipe.w_range}, {sym} W{recipe.w_bits}, {steps}"


def _vs_float(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement (percent) and mean KL(softmax(ref) || softmax(out)) of logits (N, K)."""
    from ..calib.loss import calibration_loss

    return {"agreement": 100.0 * float((out.argmax(1) == ref.argmax(1)).float().mean()),
            "kl": calibration_loss([ref], [out])}


def _quality(suite: Any, qmodel: nn.Module, paths: dict[str, Path], threads: int) -> dict[str, Any]:
    """Simulated vs ONNX Runtime (ours) and both integer models vs the float model."""
    from ..evaluate import predict, top1, top5_agreement

    x, y = suite.x_test, suite.y_test
    ref = suite.float_logits()
    sim = predict(qmodel, x)
    ours, ort_ = (ort_predict(paths[t], x, threads=threads) for t in ("ours", "ort"))
    row: dict[str, Any] = {
        "onnx_vs_sim_agreement": 100.0 * float((sim.argmax(1) == ours.argmax(1)).float().mean()),
        "n_eval": len(x)}
    for tag, logits in (("sim", sim), ("ours", ours), ("ort", ort_)):
        row.update({f"{tag}_vs_float_{k}": v for k, v in _vs_float(ref, logits).items()})
    row["agreement"], row["kl"] = row["ours_vs_float_agreement"], row["ours_vs_float_kl"]
    if ours.dim() == 2 and ours.shape[1] > 5:
        row["top5_agreement"] = top5_agreement(ref, ours)
    if y is not None:
        row.update({"sim_top1": top1(sim, y), "onnx_top1": top1(ours, y), "quant_top1": top1(ours, y),
                    "ort_top1": top1(ort_, y), "parity_delta": top1(ours, y) - top1(sim, y),
                    "delta": top1(ours, y) - top1(ref, y)})
    return row


def _reduce_range(cpu: dict[str, Any]) -> bool:
    """7-bit weights for ONNX Runtime: on x86 CPUs without VNNI (saturating int16 pair sums)."""
    return bool(cpu["x86"] and not cpu["vnni"])


def deploy_recipe(suite: Any, cfg: Any, cpu: dict[str, Any] | None = None,
                  base: Any = None) -> Any:
    """The recipe of the deployed ptqkit model for ``cfg``: ``base`` (default: the default
    recipe, mse ranges and automatic weight symmetry, at the row's bits, first/last policy and
    seed), then the int_outputs step, so that ONNX Runtime runs every layer, residual add and
    pooling in integer kernels.

    On x86 CPUs without VNNI (``cpu``, default this machine's :func:`cpu_info`) weights are
    symmetric and at most 7 bits (ONNX Runtime's ``reduce_range``): the U8S8 kernels there add
    pairs of u8 x s8 products in saturating int16, which full-range int8 weights overflow; with
    ``first_last_8bit`` the first and last layers then keep 8-bit inputs and 7-bit weights.
    """
    cpu = cpu if cpu is not None else cpu_info()
    base = base if base is not None else cfg.recipe()
    if not _reduce_range(cpu):
        return base.with_steps("int_outputs")
    from ..nn.prepare import LayerPolicy, prepare

    calib = suite.calib(cfg.calib_size, cfg.seed)
    prepared = prepare(suite.float_model, LayerPolicy(), lambda m: calib.forward(m, calib.batches[0]))
    order: list[str] = list(prepared.ptq.layer_order)  # type: ignore[union-attr, arg-type]
    overrides = {order[0]: (7, 8), order[-1]: (7, 8)} if cfg.first_last_8bit else {}
    return dataclasses.replace(base, w_bits=min(base.w_bits, 7), w_symmetric=True,
                               first_last_8bit=False,
                               overrides={**base.overrides, **overrides}).with_steps("int_outputs")


def checkpoint_sizes(float_model: nn.Module, qmodel: nn.Module, out: Path) -> dict[str, Any]:
    """Bytes of the float state_dict (safetensors) and of the packed quantized checkpoint."""
    from safetensors.torch import save_file

    from .packed import save

    save_file({k: v.contiguous() for k, v in float_model.state_dict().items()},
              str(out / "float.safetensors"))
    packed = save(qmodel, out / "ptqkit.packed.safetensors")
    fb, pb = (out / "float.safetensors").stat().st_size, packed.stat().st_size
    return {"float_ckpt_bytes": fb, "packed_bytes": pb, "packed_over_float": pb / fb}


def parity(qmodel: nn.Module, onnx_path: str | os.PathLike[str], x: torch.Tensor,
           y: torch.Tensor) -> dict[str, float]:
    """Top-1 of the simulated and the ONNX Runtime model, and how often their predictions agree."""
    from ..evaluate import predict, top1

    sim, ort_ = predict(qmodel, x), predict(OrtModule(onnx_path), x)
    return {"sim_top1": top1(sim, y), "onnx_top1": top1(ort_, y), "quant_top1": top1(ort_, y),
            "parity_delta": top1(ort_, y) - top1(sim, y),
            "onnx_vs_sim_agreement": 100.0 * float((sim.argmax(1) == ort_.argmax(1)).float().mean())}


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def deploy_markdown(rows: list[dict[str, Any]]) -> str:
    """Latency / size / closeness summary of deploy rows: one line per model (float ONNX, ORT's
    own int8, ptqkit's export), ms medians at batch 1 and 32, ONNX size in KB (ptqkit's line
    also the packed checkpoint), agreement / KL with the float model, integer kernels."""
    head = ("| suite | W/A | CPU (VNNI) | model | agree vs float % | KL | b1 ms | b32 ms | "
            "KB | packed KB | int kernels |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "ours_bytes" not in r:
            continue
        cpu = r.get("cpu", {})
        where = f"{cpu.get('model', '?')} ({', '.join(cpu.get('vnni', [])) or 'no VNNI'})"
        for tag, name in (("float", "float ONNX"), ("ort", "ORT int8"), ("ours", "ptqkit")):
            agree, kl = ((100.0, 0.0) if tag == "float"
                         else (r.get(f"{tag}_vs_float_agreement"), r.get(f"{tag}_vs_float_kl")))
            packed = _fmt(r["packed_bytes"] / 1024, ".0f") if tag == "ours" and "packed_bytes" in r else "-"
            lines.append(
                f"| {r['suite']} | W{r['w_bits']}A{r['a_bits']} | {where} | {name} | "
                f"{_fmt(agree)} | {_fmt(kl, '.4f')} | {_fmt(r.get(f'{tag}_latency_b1_ms'))} | "
                f"{_fmt(r.get(f'{tag}_latency_b32_ms'), '.1f')} | {r[f'{tag}_bytes'] / 1024:.0f} | "
                f"{packed} | {r[f'{tag}_kernels']['int_kernels']} |")
    return "\n".join(lines)
