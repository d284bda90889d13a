"""Merge the calibration-size study's per-job JSON files into one row file, a mean/std summary and
a plot per suite, plus a markdown table on stdout.

Session 10 (held-out iterate selection in AdaQuant) re-ran the study into parts-s10/; sessions 10
and 11 filled in sizes 100 and 1000 there, and the range methods at 1000 (MSE and ACIQ in
parts-s11/). Session 11 also ran seq-AdaQuant with ``holdout: always`` (a variant that was tried
and not made the default; NOTES-s11.md) into parts-s11/: those rows are named
"seq-adaquant-always". Session 9's parallel AdaQuant rows at n=1 (parts/, before the held-out
fix) are added as "adaquant-s9" for comparison.

Session 12 made AdaQuant choose its start ranges by calibration KL (``start: best``) and re-ran
both modes into parts-s12/ under their bench names "adaquant" and "seq-adaquant". The earlier
rows of those two methods started from the MSE ranges: they are renamed "mse+adaquant" and
"mse+seq-adaquant" (the bench method of that name is the same computation).

usage: PYTHONPATH=src python results/issue4/make_study_summary.py
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

from ptqkit.bench import markdown_table, merge_study, plot_study, study_summary, write_json

HERE = Path(__file__).parent
PLOTTED = ("minmax", "adaquant", "seq-adaquant", "mse+seq-adaquant", "lapq", "aciq", "mse")


def s9_rows(suite: str) -> list[dict[str, Any]]:
    """Session 9's parallel AdaQuant rows (no held-out selection), renamed "adaquant-s9"."""
    rows = []
    for path in sorted(glob.glob(str(HERE / "parts" / f"study-{suite}-n*.json"))):
        for r in json.loads(Path(path).read_text()):
            if r.get("method") == "adaquant":
                rows.append({**r, "method": "adaquant-s9"})
    return rows


def _part(name: str, suite: str) -> list[dict[str, Any]]:
    return merge_study(sorted(glob.glob(str(HERE / name / f"study-{suite}-*.json"))))


def study_rows(suite: str) -> list[dict[str, Any]]:
    """The study's rows for one suite: parts-s10, -s11 and -s12, earlier defaults renamed."""
    s10, s11, s12 = _part("parts-s10", suite), _part("parts-s11", suite), _part("parts-s12", suite)
    for r in s10:
        if r["method"] in ("adaquant", "seq-adaquant"):
            r["method"] = "mse+" + r["method"]
    for r in s11:
        if r["method"] == "seq-adaquant":
            r["method"] = "seq-adaquant-always"
    return s10 + s11 + s12 + s9_rows(suite)


def per_seed_lines(summary: list[dict[str, Any]]) -> list[str]:
    """Per-seed top-1 differences: every AdaQuant variant against min-max, and seq-AdaQuant
    against parallel AdaQuant, MSE, ACIQ and LAPQ (the issue's criteria), where both were run."""
    by = {(r["method"], r["calib_size"]): r["top1_per_seed"] for r in summary}
    pairs = [(m, "minmax", size) for m, size in by if "adaquant" in m]
    pairs += [("seq-adaquant", other, size) for m, size in by if m == "seq-adaquant"
              for other in ("adaquant", "mse", "aciq", "lapq", "mse+seq-adaquant")]
    pairs += [("adaquant", "mse+adaquant", size) for m, size in by if m == "adaquant"]
    lines = []
    for method, base, size in sorted(pairs, key=lambda p: (p[2], p[1], p[0])):
        if (base, size) not in by:
            continue
        per_seed, ref = by[(method, size)], by[(base, size)]
        diffs = [per_seed[s] - ref[s] for s in per_seed if s in ref]
        wins = sum(d > 0 for d in diffs)
        lines.append(f"size {size}: {method} - {base} per seed [{', '.join(f'{d:+.2f}' for d in diffs)}]"
                     f", mean {sum(diffs) / max(len(diffs), 1):+.2f}, better on {wins}/{len(diffs)} seeds")
    return lines


def closeness_lines(rows: list[dict[str, Any]], size: int = 1000) -> list[str]:
    """Mean test KL to float and agreement per method at one calibration size, and on how many
    seeds seq-AdaQuant is the closer of each pair (lower KL, higher agreement)."""
    by: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        if r["calib_size"] == size:
            by.setdefault(r["method"], {})[int(r["seed"])] = r
    seq = by.get("seq-adaquant", {})
    lines = []
    for method, per_seed in sorted(by.items()):
        kl = sum(float(r["kl"]) for r in per_seed.values()) / len(per_seed)
        agree = sum(float(r["agreement"]) for r in per_seed.values()) / len(per_seed)
        line = f"size {size}: {method} mean KL {kl:.4f}, agreement {agree:.2f}%"
        common = [s for s in per_seed if s in seq]
        if method != "seq-adaquant" and common:
            lower = sum(float(seq[s]["kl"]) < float(per_seed[s]["kl"]) for s in common)
            higher = sum(float(seq[s]["agreement"]) > float(per_seed[s]["agreement"]) for s in common)
            line += (f"; seq-adaquant lower KL on {lower}/{len(common)} seeds, higher agreement"
                     f" on {higher}/{len(common)}")
        lines.append(line)
    return lines


def ten_draw_lines(rows: list[dict[str, Any]], suite: str) -> list[str]:
    """Session 12 added calibration draws 5-9 at 1000 images for seq-AdaQuant and the range
    methods it is compared with (parts-s12-extra/, one bench run per seed): seq-AdaQuant minus
    each of them per draw over all ten draws."""
    extra = merge_study(sorted(glob.glob(str(HERE / "parts-s12-extra" / f"{suite}-seed*.json"))))
    if not extra:
        return []
    by: dict[str, dict[int, float]] = {}
    kl: dict[str, dict[int, float]] = {}
    for r in [r for r in rows if r["calib_size"] == 1000] + extra:
        by.setdefault(r["method"], {})[int(r["seed"])] = float(r["quant_top1"])
        kl.setdefault(r["method"], {})[int(r["seed"])] = float(r["kl"])
    seq, lines = by["seq-adaquant"], []
    for other in sorted({r["method"] for r in extra} - {"seq-adaquant"}):
        common = sorted(set(seq) & set(by[other]))
        diffs = [seq[s] - by[other][s] for s in common]
        mean = sum(diffs) / len(diffs)
        std = (sum((d - mean) ** 2 for d in diffs) / max(len(diffs) - 1, 1)) ** 0.5
        lines.append(f"{len(common)} draws: seq-adaquant {sum(seq[s] for s in common) / len(common):.2f}"
                     f", {other} {sum(by[other][s] for s in common) / len(common):.2f}; difference"
                     f" per draw [{', '.join(f'{d:+.2f}' for d in diffs)}], mean {mean:+.3f}"
                     f" (std {std:.2f}), seq better on {sum(d > 0 for d in diffs)}/{len(diffs)};"
                     f" mean KL {sum(kl['seq-adaquant'][s] for s in common) / len(common):.4f} vs"
                     f" {sum(kl[other][s] for s in common) / len(common):.4f}, seq lower on"
                     f" {sum(kl['seq-adaquant'][s] < kl[other][s] for s in common)}/{len(common)}")
    return lines


def main() -> None:
    for suite in ("fmnist-resnet20", "fmnist-mobilenetv2"):
        rows = study_rows(suite)
        if not rows:
            continue
        summary = study_summary(rows)
        write_json(rows + [{"summary": summary}], HERE / f"calib-study-{suite}-w4a4.json")
        plot_study([r for r in summary if r["method"] in PLOTTED],
                   HERE / f"calib-study-{suite}-w4a4.png")
        print(f"\n{suite} W4A4 ({len(rows)} rows)\n")
        print(markdown_table(summary, ("method", "calib_size", "seeds", "fp32_top1", "top1_mean",
                                       "top1_std")))
        print("\n".join(per_seed_lines(summary)))
        print("\n".join(closeness_lines(rows)))
        print("\n".join(ten_draw_lines(rows, suite)))


if __name__ == "__main__":
    main()
