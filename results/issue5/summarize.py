"""Merge the sweep parts (one queue job per suite and method group) into sweep-<suite>.json and
print the table with the issue-5 criteria per compression. Run from the repo root:
    PYTHONPATH=src python results/issue5/summarize.py > results/issue5/summary.md
It also draws curve-S.png (top-1) and curve-S-kl.png (test KL to float, log scale).

Parts: parts/sweep-S-{ranges,adv}.json (session 9: every method, the paper's IP, BN tuning before
its fix) and parts/sweep-S-s10-*.json (session 10: ip / light / advanced with the context
refinement, BN tuning fixed). A row of a later part replaces the row of an earlier part for the
same (method, budget) in the merged file; the parts keep every row.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
SUITES = ("fmnist-resnet20", "fmnist-mobilenetv2")
METHODS = ("greedy-accuracy", "greedy-compression", "ip", "light", "advanced")


def _parts(suite: str) -> list[Path]:
    parts = sorted((HERE / "parts").glob(f"sweep-{suite}-*.json"))
    return [p for p in parts if "-s10-" not in p.name] + [p for p in parts if "-s10-" in p.name]


def merge(suite: str) -> list[dict]:
    merged: dict[tuple, dict] = {}
    for part in _parts(suite):
        for r in json.loads(part.read_text()):
            merged[(r["method"], r.get("budget"))] = {**r, "part": part.name}
    rows = list(merged.values())
    if rows:
        (HERE / f"sweep-{suite}.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return rows


def fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def _ok(values: list[float | None], higher: bool = True) -> str:
    """'yes' when values[0] >= values[1] >= ... (<= for lower-is-better), '-' when one is missing."""
    if None in values:
        return "-"
    pairs = zip(values, values[1:])
    return "yes" if all((a >= b) if higher else (a <= b) for a, b in pairs) else "no"


def _ip_vs_greedy(v: dict[str, float | None], higher: bool) -> str:
    g = [v["greedy-accuracy"], v["greedy-compression"]]
    if v["ip"] is None or None in g:
        return "-"
    best = max(g) if higher else min(g)  # type: ignore[type-var]
    return "yes" if (v["ip"] >= best if higher else v["ip"] <= best) else "no"


def table(suite: str, rows: list[dict]) -> None:
    pts = {(r["method"], r["budget"]): r for r in rows if r.get("budget") is not None}
    fp = next((r["fp32_top1"] for r in pts.values()), None)
    print(f"\n### {suite} (float top-1 {fmt(fp)})\n")
    print("Test top-1 (weight compression in brackets); criteria on top-1, then on the test KL "
          "to float (lower is better):\n")
    print("| budget | " + " | ".join(METHODS) + " | IP >= greedy | adv >= light >= IP "
          "| KL: IP <= greedy | KL: adv <= light <= IP |")
    print("|---" * (len(METHODS) + 5) + "|")
    for c in sorted({b for _, b in pts}, reverse=True):
        top = {m: pts.get((m, c), {}).get("quant_top1") for m in METHODS}
        kl = {m: pts.get((m, c), {}).get("kl") for m in METHODS}
        cells = []
        for m in METHODS:
            r = pts.get((m, c), {})
            cells.append(f"{fmt(top[m])} ({fmt(r.get('compression'), 3)})" if top[m] is not None
                         else ("infeasible" if r.get("error") else "not run"))
        chain = [m for m in ("advanced", "light", "ip")]
        print(f"| {c} | " + " | ".join(cells) + f" | {_ip_vs_greedy(top, True)} | "
              f"{_ok([top[m] for m in chain])} | {_ip_vs_greedy(kl, False)} | "
              f"{_ok([kl[m] for m in chain], higher=False)} |")
    _kl_table(pts)
    _refinement(pts)


def _kl_table(pts: dict[tuple, dict]) -> None:
    print("\nTest KL to float x 1e3 / calibration KL x 1e3 (after the global steps for light and "
          "advanced):\n")
    print("| budget | " + " | ".join(METHODS) + " |")
    print("|---" * (len(METHODS) + 1) + "|")
    for c in sorted({b for _, b in pts}, reverse=True):
        cells = []
        for m in METHODS:
            r = pts.get((m, c), {})
            calib = r.get("calib_loss_after_post", r.get("measured_calib_loss"))
            cells.append("-" if r.get("kl") is None else
                         f"{1e3 * r['kl']:.2f} / {fmt(None if calib is None else 1e3 * calib)}")
        print(f"| {c} | " + " | ".join(cells) + " |")


def _refinement(pts: dict[tuple, dict]) -> None:
    print("\nContext refinement (calibration KL: additive prediction of the IP choice -> measured "
          "at round 0 -> after each round; per attempt: layers changed, local prediction, "
          "measured; * = accepted):\n")
    for (m, c), r in sorted(pts.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        rounds = r.get("refine") or []
        if m not in ("ip", "advanced") or not rounds:
            continue
        steps = []
        for rd in rounds[1:]:
            tries = " ".join(f"{'*' if rd['accepted'] and i == len(rd['attempts']) - 1 else ''}"
                             f"[{a['changed']}: {a['predicted_loss']:.4g} -> {a['measured_loss']:.4g}]"
                             for i, a in enumerate(rd["attempts"])) or "[no move predicted to help]"
            steps.append(f"r{rd['round']} {tries}")
        print(f"- {m} @{c}: {rounds[0]['predicted_loss']:.4g} -> {rounds[0]['measured_loss']:.4g} -> "
              f"{r['measured_calib_loss']:.4g} ({'; '.join(steps)})")


if __name__ == "__main__":
    from ptqkit.sweep import plot_curves

    for s in SUITES:
        rows = merge(s)
        table(s, rows)
        if any(r.get("kl") is not None for r in rows):
            plot_curves(rows, HERE / f"curve-{s}.png")
            plot_curves(rows, HERE / f"curve-{s}-kl.png", metric="kl")
