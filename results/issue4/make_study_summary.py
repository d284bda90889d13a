"""Merge the calibration-size study's per-job JSON files into one row file, a mean/std summary and
a plot per suite, plus a markdown table on stdout.

Session 10 (held-out iterate selection in AdaQuant) re-ran the study into parts-s10/; those rows
are the study. Session 9's parallel AdaQuant rows at n=1 (parts/, before the fix) are added under
the method name "adaquant-s9" for comparison; session 9's other rows are superseded.

usage: PYTHONPATH=src python results/issue4/make_study_summary.py
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

from ptqkit.bench import markdown_table, merge_study, plot_study, study_summary, write_json

HERE = Path(__file__).parent


def s9_rows(suite: str) -> list[dict[str, Any]]:
    """Session 9's parallel AdaQuant rows (no held-out selection), renamed "adaquant-s9"."""
    rows = []
    for path in sorted(glob.glob(str(HERE / "parts" / f"study-{suite}-n*.json"))):
        for r in json.loads(Path(path).read_text()):
            if r.get("method") == "adaquant":
                rows.append({**r, "method": "adaquant-s9"})
    return rows


def per_seed_lines(summary: list[dict[str, Any]]) -> list[str]:
    by = {(r["method"], r["calib_size"]): r["top1_per_seed"] for r in summary}
    lines = []
    for (method, size), per_seed in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if "adaquant" not in method or ("minmax", size) not in by:
            continue
        mm = by[("minmax", size)]
        diffs = [per_seed[s] - mm[s] for s in per_seed if s in mm]
        wins = sum(d > 0 for d in diffs)
        lines.append(f"size {size}: {method} - minmax per seed [{', '.join(f'{d:+.2f}' for d in diffs)}]"
                     f", mean {sum(diffs) / max(len(diffs), 1):+.2f}, better on {wins}/{len(diffs)} seeds")
    return lines


def main() -> None:
    for suite in ("fmnist-resnet20", "fmnist-mobilenetv2"):
        parts = sorted(glob.glob(str(HERE / "parts-s10" / f"study-{suite}-n*.json")))
        if not parts:
            continue
        rows = merge_study(parts) + s9_rows(suite)
        summary = study_summary(rows)
        write_json(rows + [{"summary": summary}], HERE / f"calib-study-{suite}-w4a4.json")
        plot_study(summary, HERE / f"calib-study-{suite}-w4a4.png")
        print(f"\n{suite} W4A4 ({len(parts)} job files, {len(rows)} rows)\n")
        print(markdown_table(summary, ("method", "calib_size", "seeds", "fp32_top1", "top1_mean",
                                       "top1_std")))
        print("\n".join(per_seed_lines(summary)))


if __name__ == "__main__":
    main()
