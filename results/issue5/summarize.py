"""Merge the sweep parts (one queue job per suite and method group) into sweep-<suite>.json and
print the table with the issue-5 criteria per compression. Run from the repo root:
    python results/issue5/summarize.py
(PYTHONPATH=src) and draws curve-S.png (top-1) and curve-S-kl.png (test KL to float, log scale);
the same top-1 plot: ptqkit sweep --suite S --json results/issue5/sweep-S.json --plot
results/issue5/curve-S.png --report-only
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
SUITES = ("fmnist-resnet20", "fmnist-mobilenetv2")
METHODS = ("greedy-accuracy", "greedy-compression", "ip", "light", "advanced")


def merge(suite: str) -> list[dict]:
    rows: list[dict] = []
    for part in sorted((HERE / "parts").glob(f"sweep-{suite}-*.json")):
        rows += json.loads(part.read_text())
    if not rows:
        return rows
    (HERE / f"sweep-{suite}.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return rows


def fmt(v: float | None, nd: int = 2) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def table(suite: str, rows: list[dict]) -> None:
    pts = {(r["method"], r["budget"]): r for r in rows if r.get("budget") is not None}
    fp = next((r["fp32_top1"] for r in pts.values()), None)
    print(f"\n### {suite} (float top-1 {fmt(fp)})\n")
    print("| budget | " + " | ".join(METHODS) + " | IP >= greedy | adv >= light >= IP |")
    print("|---" * (len(METHODS) + 3) + "|")
    for c in sorted({b for _, b in pts}, reverse=True):
        top = {m: pts.get((m, c), {}).get("quant_top1") for m in METHODS}
        cells = []
        for m in METHODS:
            r = pts.get((m, c), {})
            cells.append(f"{fmt(top[m])} ({fmt(r.get('compression'), 3)})" if top[m] is not None
                         else ("infeasible" if r.get("error") else "not run"))
        g = [top[m] for m in ("greedy-accuracy", "greedy-compression")]
        ip_ok = "-" if top["ip"] is None or None in g else ("yes" if top["ip"] >= max(g) else "no")
        chain = [top["advanced"], top["light"], top["ip"]]
        ch_ok = "-" if None in chain else ("yes" if chain[0] >= chain[1] >= chain[2] else "no")
        print(f"| {c} | " + " | ".join(cells) + f" | {ip_ok} | {ch_ok} |")
    print("\nIP alternatives (predicted -> measured calibration KL; * = kept):")
    for (m, c), r in sorted(pts.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        alts = r.get("alternatives") or []
        if m in ("ip", "advanced") and alts:
            best = min(range(len(alts)), key=lambda i: alts[i]["measured_loss"])
            print(f"  {m} @{c}: " + ", ".join(
                f"{'*' if i == best else ''}{a['predicted_loss']:.4g}->{a['measured_loss']:.4g}"
                for i, a in enumerate(alts)))


if __name__ == "__main__":
    from ptqkit.sweep import plot_curves

    for s in SUITES:
        rows = merge(s)
        table(s, rows)
        if any(r.get("kl") is not None for r in rows):
            plot_curves(rows, HERE / f"curve-{s}.png")
            plot_curves(rows, HERE / f"curve-{s}-kl.png", metric="kl")
