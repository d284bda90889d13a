"""Self-contained HTML reports of a run directory or a sweep, and stage lines for logs.

:func:`run_report` and :func:`sweep_report` return one HTML document: inline CSS, a few lines of
inline JavaScript (sortable tables), plots as inline SVG drawn with matplotlib's SVG backend
(the optional extra ``ptqkit[plot]``; without it the report says so instead of plotting). Opening
the file needs no network. Numbers come from the run's report.json (or the sweep rows) as they
are; what a run did not record is shown as "-", never estimated.

:class:`StageLog` prints "stage X started" / "stage X finished (N s)" lines to stderr when stderr
is not a terminal (where the progress bars are off), e.g. in CI logs or under nohup.
"""

from __future__ import annotations

import copy
import html
import importlib.util
import io
import json
import logging
import math
import re
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

__all__ = ["run_report", "run_report_from_dir", "sweep_report", "write_html", "layer_facts",
           "StageLog", "LOW_SQNR_DB"]

LOW_SQNR_DB = 10.0  # a layer this far (dB) below the model's median SQNR is highlighted

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12.5px}td,th{padding:3px 7px;border-bottom:1px solid #eee;
text-align:right;white-space:nowrap}td:first-child,th:first-child,td.t,th.t{text-align:left}
th{background:#f4f4f4;position:sticky;top:0}table.sortable th{cursor:pointer}
table.sortable th:after{content:" \\2195";color:#aaa}tr.low td{background:#fde2e1}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-height:320px}
.kv td{text-align:left}.note{color:#666}.plot svg{max-width:100%;height:auto}
.step{margin:10px 0;padding:6px 10px;border-left:3px solid #4a7bd0;background:#fafbff}
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
  var b=t.tBodies[0],rows=Array.from(b.rows),d=th.dataset.dir==='a'?-1:1;th.dataset.dir=d>0?'a':'d';
  rows.sort(function(x,y){var p=x.cells[i].dataset.v,q=y.cells[i].dataset.v;
   var u=parseFloat(p),v=parseFloat(q);
   if(!isNaN(u)&&!isNaN(v))return d*(u-v);if(isNaN(u)!==isNaN(v))return isNaN(u)?1:-1;
   return d*String(p).localeCompare(String(q));});
  rows.forEach(function(r){b.appendChild(r);});});});});
"""

_NO_PLOTS = "plots need matplotlib: pip install 'ptqkit[plot]'"


# ----------------------------------------------------------------------------- small helpers
def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _cell(v: Any, text: str | None = None, cls: str = "") -> str:
    key = v if isinstance(v, (int, float)) and not isinstance(v, bool) else (v if v is not None else "")
    c = f' class="{cls}"' if cls else ""
    return f'<td{c} data-v="{_esc(key)}">{_esc(_num(v) if text is None else text)}</td>'


def _table(head: Sequence[str], rows: Sequence[str], cls: str = "sortable", tid: str = "") -> str:
    ths = "".join(f"<th>{_esc(h)}</th>" for h in head)
    ident = f' id="{tid}"' if tid else ""
    return (f'<table class="{cls}"{ident}><thead><tr>{ths}</tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def _kv(pairs: Sequence[tuple[str, str]]) -> str:
    return '<table class="kv">' + "".join(
        f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in pairs) + "</table>"


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _svg(fig: Any) -> str:
    """The figure as an inline <svg> element (text kept as text, no metadata, no DOCTYPE)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
    return '<div class="plot">' + text[text.index("<svg"):] + "</div>"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"
    return plt


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ptqkit")
    except Exception:  # not installed as a distribution (e.g. run from the source tree)
        from . import __version__

        return __version__


# ----------------------------------------------------------------------------- layer facts
def _range_of(q: Any) -> tuple[float, float] | None:
    """(lowest, highest) value the quantizer represents over all its channels, or None."""
    if not getattr(q, "active", True) or getattr(q, "scale", None) is None:
        return None
    scale = q.scale.detach().float().reshape(-1)
    zp = q.zero_point.detach().float().reshape(-1) if getattr(q, "zero_point", None) is not None \
        else torch.zeros_like(scale)
    lo, hi = scale * (q.spec.qmin - zp), scale * (q.spec.qmax - zp)
    return float(lo.min()), float(hi.max())


@torch.no_grad()
def layer_facts(qmodel: nn.Module, example: Any) -> dict[str, dict[str, Any]]:
    """{layer: {"shape": weight shape, "macs": MACs for ``example``, "w_range": (lo, hi),
    "a_range": (lo, hi), "params": weight elements}} for every quantized layer, in execution
    order. A copy of ``qmodel`` runs one forward pass on ``example`` (a batch of 1) to count
    the MACs (see :mod:`ptqkit.nn.coverage`); ``qmodel`` itself is not run."""
    from .nn.coverage import MacCounter
    from .nn.modules import quant_layers

    model = copy.deepcopy(qmodel).eval()
    macs: dict[str, int] = {}
    if isinstance(example, torch.Tensor):
        with MacCounter(model) as counter:
            model(example[:1])
        macs = counter.macs
    out = {}
    for name, layer in quant_layers(model).items():
        out[name] = {"shape": list(layer.weight.shape), "params": int(layer.weight.numel()),
                     "macs": macs.get(name), "w_range": _range_of(layer.w_quant),
                     "a_range": _range_of(layer.a_quant)}
    return out


# ----------------------------------------------------------------------------- run report
def _table_of(report: Mapping[str, Any]) -> dict[str, Any] | None:
    for s in report.get("steps", []):
        if isinstance(s.get("table"), dict) and s["table"].get("layers"):
            return dict(s["table"])
    return None


def _sensitivity(table: Mapping[str, Any] | None, layers: Mapping[str, Any]
                 ) -> dict[str, tuple[float | None, float | None]]:
    """{layer: (loss increase of its chosen option, of its lowest-bit allowed option)}."""
    if not table:
        return {}
    options = [tuple(o) for o in table["options"]]
    out: dict[str, tuple[float | None, float | None]] = {}
    for i, name in enumerate(table["layers"]):
        info = layers.get(name, {})
        chosen = (info.get("w_bits"), info.get("a_bits"))
        row, allowed = table["loss"][i], table["allowed"][i]
        c = row[options.index(chosen)] if chosen in options and allowed[options.index(chosen)] else None
        lows = [(sum(o), row[j]) for j, o in enumerate(options) if allowed[j]]
        out[name] = (c, min(lows)[1] if lows else None)
    return out


def _fmt_range(r: Any) -> str:
    return "-" if not r else f"[{_num(float(r[0]), 3)}, {_num(float(r[1]), 3)}]"


def _layer_rows(layers: Mapping[str, Any], facts: Mapping[str, Any], table: Mapping[str, Any] | None
                ) -> tuple[list[str], float | None]:
    sqnrs = [v["sqnr_db"] for v in layers.values() if isinstance(v.get("sqnr_db"), (int, float))
             and math.isfinite(v["sqnr_db"])]
    median = statistics.median(sqnrs) if sqnrs else None
    sens = _sensitivity(table, layers)
    tmacs = dict(zip(table["layers"], table["macs"])) if table else {}
    rows = []
    for i, (name, info) in enumerate(layers.items()):
        f = facts.get(name, {})
        s = info.get("sqnr_db")
        low = median is not None and isinstance(s, (int, float)) and s < median - LOW_SQNR_DB
        macs = f.get("macs") if f.get("macs") is not None else tmacs.get(name)
        shape = f.get("shape")
        chosen, lowest = sens.get(name, (None, None))
        cells = [_cell(i), _cell(name, cls="t"), _cell(info.get("type"), cls="t"),
                 _cell(str(shape) if shape else None, "x".join(map(str, shape)) if shape else "-", "t"),
                 _cell(int(macs) if macs is not None else None), _cell(info.get("w_bits")),
                 _cell(info.get("a_bits")),
                 _cell(info.get("w_range"), f"{info.get('w_range') or '-'} {_fmt_range(f.get('w_range'))}",
                       "t"),
                 _cell(info.get("a_range"), f"{info.get('a_range') or '-'} {_fmt_range(f.get('a_range'))}",
                       "t"),
                 _cell(s, "-" if s is None else f"{s:.1f}"), _cell(chosen), _cell(lowest)]
        rows.append(f'<tr class="{"low layer" if low else "layer"}">' + "".join(cells) + "</tr>")
    return rows, median


def _plots_run(layers: Mapping[str, Any], table: Mapping[str, Any] | None,
               mp_bits: bool, median: float | None) -> list[str]:
    plt = _pyplot()
    out = []
    names = list(layers)
    sq = [layers[n].get("sqnr_db") for n in names]
    if any(isinstance(v, (int, float)) for v in sq):
        fig, ax = plt.subplots(figsize=(11, 3.2))
        xs = [i for i, v in enumerate(sq) if isinstance(v, (int, float))]
        ys = [sq[i] for i in xs]
        ax.plot(xs, ys, marker="o", ms=3, lw=1)
        if median is not None:
            ax.axhline(median, color="k", ls="--", lw=0.8, label=f"median {median:.1f} dB")
            ax.axhline(median - LOW_SQNR_DB, color="r", ls=":", lw=0.8,
                       label=f"median - {LOW_SQNR_DB:.0f} dB")
            ax.legend(fontsize=8)
        ax.set(xlabel="layer (execution order)", ylabel="SQNR vs float (dB)",
               title="Output SQNR per layer")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out.append(_svg(fig))
    if mp_bits and table:
        params = dict(zip(table["layers"], table["params"]))
        fig, ax = plt.subplots(figsize=(11, 3.2))
        idx = range(len(names))
        ax.bar([i - 0.2 for i in idx], [layers[n].get("w_bits") or 0 for n in names], 0.4,
               label="w_bits")
        ax.bar([i + 0.2 for i in idx], [layers[n].get("a_bits") or 0 for n in names], 0.4,
               label="a_bits")
        ax.set(xlabel="layer (execution order)", ylabel="bits", title="Bits chosen per layer and layer size")
        ax2 = ax.twinx()
        ax2.plot(list(idx), [params.get(n, float("nan")) for n in names], color="k", marker=".",
                 lw=0.8, label="weights")
        ax2.set_yscale("log")
        ax2.set_ylabel("weight elements")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        out.append(_svg(fig))
    if table:
        import numpy as np

        loss = np.array(table["loss"], dtype=float)
        loss[~np.array(table["allowed"], dtype=bool)] = np.nan
        shown = np.log10(np.clip(loss, 1e-9, None))
        fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(table["options"]) + 3),
                                        max(3.0, 0.14 * len(table["layers"]) + 1.5)))
        im = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(table["options"])),
                      [f"w{w}a{a}" for w, a in table["options"]])
        step = max(1, len(table["layers"]) // 40)
        ax.set_yticks(range(0, len(table["layers"]), step), table["layers"][::step], fontsize=6)
        ax.set_title("Sensitivity: log10 loss increase (blank: not allowed)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        out.append(_svg(fig))
    return out


def _metrics(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    metrics = report.get("metrics")
    if not isinstance(metrics, Mapping) or not metrics:
        return [("test metrics", '<span class="note">not measured by quantize (ptqkit eval RUN_DIR '
                                 'for zoo models, ptqkit bench for the suites)</span>')]
    out = []
    for k, v in metrics.items():
        if k.endswith("_se"):
            continue
        se = metrics.get(f"{k}_se")
        out.append((k, _esc(_num(v)) + (f" &plusmn; {_esc(_num(se, 2))}" if se is not None else "")))
    return out


def _calib_loss(steps: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """The last calibration loss a step recorded (KL to the float outputs), with its step."""
    for s in reversed(steps):
        for key in ("kl_after", "measured_loss", "loss"):
            if isinstance(s.get(key), (int, float)) and not isinstance(s.get(key), bool):
                return f"calibration loss after {s['step']} ({key})", _esc(_num(s[key]))
    return None


def _compression(facts: Mapping[str, Any], layers: Mapping[str, Any],
                 steps: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    out = []
    num = sum(f["params"] * (layers.get(n, {}).get("w_bits") or 32) for n, f in facts.items()
              if f.get("params"))
    den = sum(f["params"] * 32 for f in facts.values() if f.get("params"))
    if den:
        out.append(("weight compression (quantized layers, bits / 32)", _esc(f"{num / den:.4f}")))
    for s in steps:
        pred = s.get("predicted")
        if isinstance(pred, Mapping):
            for key in ("compression", "bops"):
                if isinstance(pred.get(key), (int, float)):
                    label = "BOPs share (vs float)" if key == "bops" else "weight compression (IP)"
                    out.append((f"{label}, {s['step']}", _esc(_num(float(pred[key])))))
    return out


_SKIP = {"table", "bits", "step", "available", "kl_by_target"}


def _flat(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in summary.items():
        if k in _SKIP and not prefix:
            continue
        if isinstance(v, Mapping) and len(v) <= 12 and all(not isinstance(x, (Mapping, list))
                                                           for x in v.values()):
            out += _flat(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out.append((prefix + k, v))
    return out


def _step_story(s: Mapping[str, Any], layers: Mapping[str, Any]) -> str:
    """One sentence of what the step changed, from the numbers its summary holds."""
    name, parts = s.get("step"), []
    if name == "adaquant" or "mse_before_sum" in s:
        per = [v["adaquant"] for v in layers.values() if isinstance(v.get("adaquant"), Mapping)]
        better = sum(1 for p in per if p.get("mse_after", math.inf) < p.get("mse_before", -math.inf))
        if per:
            parts.append(f"{better} of {len(per)} layers improved")
        if "mse_before_sum" in s:
            parts.append(f"layer MSE (sum) {_num(s['mse_before_sum'])} -> {_num(s.get('mse_after_sum'))}")
    if "kl_before" in s:
        parts.append(f"calibration KL {_num(s['kl_before'])} -> {_num(s.get('kl_after'))}")
    if "kept" in s:
        parts.append("kept" if s["kept"] else "undone by its guard (the loss went up)")
    if isinstance(s.get("predicted"), Mapping) and "loss" in s["predicted"]:
        parts.append(f"IP predicted loss {_num(s['predicted']['loss'])}, measured "
                     f"{_num(s.get('measured_loss'))}")
    if isinstance(s.get("bits"), Mapping) and s["bits"]:
        counts: dict[str, int] = {}
        for b in s["bits"].values():
            counts[b] = counts.get(b, 0) + 1
        parts.append("bits: " + ", ".join(f"{n} x {b}" for b, n in sorted(counts.items())))
    if name == "ranges":
        parts.append(f"weights {s.get('weights')}, activations {s.get('activations')}")
    return "; ".join(parts)


def _steps_html(steps: Sequence[Mapping[str, Any]], layers: Mapping[str, Any]) -> str:
    blocks = []
    for s in steps:
        if s.get("step") == "total":
            continue
        story = _step_story(s, layers)
        rest = ", ".join(f"{k} = {_num(v)}" for k, v in _flat(s) if k != "seconds")
        blocks.append(f'<div class="step"><b>{_esc(s.get("step"))}</b> '
                      f'({_esc(_num(s.get("seconds"), 3))} s)'
                      + (f"<br>{_esc(story)}" if story else "")
                      + (f'<br><span class="note">{_esc(rest)}</span>' if rest else "") + "</div>")
    return "".join(blocks) or '<p class="note">no steps recorded</p>'


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>{body}"
            f"<script>{_JS}</script></body></html>\n")


def run_report(model: str, report: Mapping[str, Any], recipe_yaml: str,
               facts: Mapping[str, Mapping[str, Any]] | None = None, notes: Sequence[str] = ()) -> str:
    """The HTML report of one quantization run.

    ``report``: the run's report.json content (``Report.to_dict()``); ``recipe_yaml``: its
    recipe.yaml text; ``facts``: :func:`layer_facts` of the quantized model (shapes, MACs,
    numeric ranges; without it those columns show the table's MACs or "-"); ``notes``: lines
    shown under the header. The per-layer table (id ``layers``) has one ``tr.layer`` row per
    quantized layer, in execution order.
    """
    layers: dict[str, Any] = dict(report.get("layers") or {})
    steps: list[Mapping[str, Any]] = list(report.get("steps") or [])
    facts = facts or {}
    table = _table_of(report)
    total = next((s.get("seconds") for s in steps if s.get("step") == "total"), None)
    cov = report.get("coverage") or {}
    header: list[tuple[str, str]] = [("model", _esc(model)), ("ptqkit", _esc(_version()))]
    header += _metrics(report)
    cl = _calib_loss(steps)
    header += [cl] if cl else []
    header += _compression(facts, layers, steps)
    header.append(("MAC coverage", _esc(cov.get("summary", "-"))))
    header.append(("time per step", _esc(", ".join(
        f"{s.get('step')} {_num(s.get('seconds'), 3)} s" for s in steps if s.get("step") != "total")
        + (f" (total {_num(total, 3)} s)" if total is not None else ""))))
    if report.get("stays_float"):
        header.append(("stays float", _esc(", ".join(report["stays_float"]))))
    rows, median = _layer_rows(layers, facts, table)
    head = ["#", "layer", "type", "weight shape", "MACs", "w_bits", "a_bits", "weight range",
            "activation range", "SQNR (dB)", "sens. chosen", "sens. lowest bits"]
    mp = any(s.get("step") == "mixed_precision" for s in steps)
    if _has_matplotlib():
        plots = "".join(_plots_run(layers, table, mp, median))
    else:
        plots = f'<p class="note">{_esc(_NO_PLOTS)}</p>'
    low = f", highlighted: SQNR more than {LOW_SQNR_DB:.0f} dB below the median"
    body = (f"<h1>ptqkit report: {_esc(model)}</h1>"
            + "".join(f'<p class="note">{_esc(n)}</p>' for n in [*notes, *report.get("notes", [])])
            + "<h2>Run</h2>" + _kv(header)
            + f"<h2>Recipe</h2><pre>{_esc(recipe_yaml)}</pre>"
            + f"<h2>Layers</h2><p class=\"note\">{len(layers)} quantized layers in execution order; "
              f"click a column to sort{low if median is not None else ''}. Sensitivity: loss "
              "increase of the layer's option in the table (chosen, lowest bits).</p>"
            + _table(head, rows, tid="layers")
            + "<h2>Plots</h2>" + plots
            + "<h2>Steps</h2>" + _steps_html(steps, layers))
    return _page(f"ptqkit report: {model}", body)


def run_report_from_dir(run_dir: str | Path, load_model: bool = True) -> str:
    """The HTML report of a run directory (verified with :func:`ptqkit.runs.read_run`).

    With ``load_model`` the run is rebuilt (:func:`ptqkit.runs.load_run`, same trust rules) to
    count MACs and read the numeric ranges; a run that cannot be rebuilt here is reported
    without them, with a note saying why."""
    import yaml

    from .runs import load_example, load_run, read_run

    run_dir = Path(run_dir)
    meta = read_run(run_dir)
    try:
        report = json.loads((run_dir / "report.json").read_text())
        recipe_yaml = (run_dir / "recipe.yaml").read_text()
        yaml.safe_load(recipe_yaml)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{run_dir}: cannot read its report.json / recipe.yaml ({exc})") from None
    if not isinstance(report, dict):
        raise ValueError(f"{run_dir / 'report.json'} does not hold a report (a JSON object)")
    facts, notes = {}, []
    if load_model:
        try:
            qmodel, _, _ = load_run(run_dir)
            facts = layer_facts(qmodel, load_example(run_dir))
        except Exception as exc:  # the report still renders from the files alone
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            notes.append(f"shapes, MACs and numeric ranges not shown: {msg}")
    return run_report(str(meta["model"]), report, recipe_yaml, facts, notes)


# ----------------------------------------------------------------------------- sweep report
def _metric(rows: Sequence[Mapping[str, Any]]) -> str:
    return "quant_top1" if any(r.get("quant_top1") is not None for r in rows) else "agreement"


def sweep_report(rows: Sequence[Mapping[str, Any]], peers: Sequence[Mapping[str, Any]] = (),
                 title: str = "sweep") -> str:
    """The HTML report of sweep rows (``ptqkit sweep --json``): per suite, the accuracy-
    compression curve of every method (top-1, or agreement with float for label-free suites)
    with the float line and ``peers`` (bench rows with ``compression``) as single points, then
    a sortable table of the points (id ``points``, one ``tr.point`` row per point)."""
    points = [r for r in rows if not str(r.get("method", "")).startswith("table:")]
    metric = _metric(points)
    plots: list[str] = []
    if not _has_matplotlib():
        plots.append(f'<p class="note">{_esc(_NO_PLOTS)}</p>')
    else:
        plt = _pyplot()
        for suite in dict.fromkeys(r.get("suite") for r in points):
            mine = [r for r in points if r.get("suite") == suite and r.get(metric) is not None
                    and r.get("compression") is not None]
            if not mine:
                continue
            fig, ax = plt.subplots(figsize=(8, 4.5))
            for method in dict.fromkeys(r["method"] for r in mine):
                pts = sorted((r["compression"], r[metric]) for r in mine if r["method"] == method)
                ax.plot(*zip(*pts), marker="o", label=method)
            ref = next((r.get("fp32_top1") for r in mine if r.get("fp32_top1") is not None), None)
            if metric == "quant_top1" and ref is not None:
                ax.axhline(ref, color="k", ls="--", lw=1, label="float")
            elif metric == "agreement":
                ax.axhline(100.0, color="k", ls="--", lw=1, label="float (100% agreement)")
            for p in peers:
                if p.get("suite") in (suite, None) and p.get(metric) is not None \
                        and p.get("compression") is not None:
                    ax.scatter([p["compression"]], [p[metric]], marker="*", s=90, zorder=5,
                               label=f"{p.get('method')} (peer)")
            ax.set(title=str(suite), xlabel="compression (weight bits / 32)",
                   ylabel="top-1 (%)" if metric == "quant_top1" else "agreement with float (%)")
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            plots.append(_svg(fig))
    cols = ["suite", "method", "budget", "compression", "fp32_top1", "quant_top1", "delta",
            "agreement", "expected_calib_loss", "measured_calib_loss", "post", "seconds", "error"]
    trs = []
    for r in [*points, *({**p, "method": f"{p.get('method')} (peer)"} for p in peers)]:
        cells = [_cell(v if not isinstance(v, list) else ", ".join(map(str, v)),
                       cls="t" if isinstance(v, (str, list)) else "")
                 for v in (r.get(c) for c in cols)]
        trs.append('<tr class="point">' + "".join(cells) + "</tr>")
    tables = [r for r in rows if str(r.get("method", "")).startswith("table:")]
    tinfo = "".join(f"<li>{_esc(r.get('suite'))} {_esc(r['method'])}: {_esc(r.get('layers'))} layers "
                    f"x {_esc(', '.join(r.get('options') or []))}, measured in "
                    f"{_esc(_num(r.get('seconds'), 3))} s</li>" for r in tables)
    body = (f"<h1>ptqkit sweep report: {_esc(title)}</h1>"
            f'<p class="note">ptqkit {_esc(_version())}; {len(points)} points'
            + (f", {len(peers)} peer rows" if peers else "") + "</p>"
            + "<h2>Curves</h2>" + "".join(plots)
            + ("<h2>Sensitivity tables</h2><ul>" + tinfo + "</ul>" if tinfo else "")
            + "<h2>Points</h2>" + _table(cols, trs, tid="points"))
    return _page(f"ptqkit sweep report: {title}", body)


# ----------------------------------------------------------------------------- writing
def write_html(text: str, out: str | Path, force: bool = False, flag: str = "--out",
               keep: Sequence[Path] = ()) -> Path:
    """Write ``text`` to ``out`` through a temporary file and ``os.replace`` (a failure leaves
    nothing). An existing file is replaced only with ``force``; ``keep`` are paths that must
    not be written (e.g. the files of a run). One-line errors otherwise."""
    from .safe_io import check_new_file, replacing_file

    out = Path(out)
    for k in keep:
        if out.resolve() == Path(k).resolve():
            raise ValueError(f"{flag} {out} is one of the run's own files; choose a path outside it")
    check_new_file(out, force, flag)
    with replacing_file(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- stage lines
def _log_stream(stream: TextIO) -> bool:
    """True for a file or pipe that is not a terminal (a log); False for a terminal and for
    in-memory streams (e.g. captured output)."""
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return not stream.isatty()


class StageLog:
    """Prints "ptqkit: stage NAME started" / "ptqkit: stage NAME finished (N s)" to ``stream``
    (default stderr) when it is a file or pipe, not a terminal (where the progress bars are
    hidden); on a terminal or an in-memory stream it prints nothing. :meth:`forward` also
    turns the INFO records of the given loggers (e.g. the pipeline's "step X done in N s")
    into such lines while it is active."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _log_stream(self.stream) if enabled is None else enabled

    def line(self, text: str) -> None:
        if self.enabled:
            print(f"ptqkit: {text}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.line(f"stage {name} started")
        t0 = time.perf_counter()
        yield
        self.line(f"stage {name} finished ({time.perf_counter() - t0:.1f} s)")

    @contextmanager
    def forward(self, *names: str) -> Iterator[None]:
        """While active, INFO records of the loggers ``names`` become stage lines (they are not
        passed on to the root logger meanwhile, so nothing is printed twice)."""
        if not self.enabled:
            yield
            return
        log = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                m = re.fullmatch(r"step (\S+) done in ([\d.]+)s", record.getMessage())
                log.line(f"stage {m.group(1)} finished ({m.group(2)} s)" if m else record.getMessage())

        handler, saved = _Handler(logging.INFO), []
        for n in names:
            lg = logging.getLogger(n)
            saved.append((lg, lg.level, lg.propagate))
            lg.setLevel(logging.INFO)
            lg.propagate = False
            lg.addHandler(handler)
        try:
            yield
        finally:
            for lg, level, propagate in saved:
                lg.removeHandler(handler)
                lg.setLevel(level)
                lg.propagate = propagate
