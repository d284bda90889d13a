"""Merge the calibration-size study's per-job JSON files (results/issue4/parts/study-*.json) into
one row file, a mean/std summary and a plot per suite, plus a markdown table on stdout.

usage: PYTHONPATH=src python results/issue4/make_study_summary.py
"""

from __future__ import annotations

import glob
from pathlib import Path

from ptqkit.bench import markdown_table, merge_study, plot_study, study_summary, write_json

HERE = Path(__file__).parent


def main() -> None:
    for suite in ("fmnist-resnet20", "fmnist-mobilenetv2"):
        parts = sorted(glob.glob(str(HERE / "parts" / f"study-{suite}-n*.json")))
        if not parts:
            continue
        rows = merge_study(parts)
        summary = study_summary(rows)
        write_json(rows + [{"summary": summary}], HERE / f"calib-study-{suite}-w4a4.json")
        plot_study(summary, HERE / f"calib-study-{suite}-w4a4.png")
        print(f"\n{suite} W4A4 ({len(parts)} job files, {len(rows)} rows)\n")
        print(markdown_table(summary, ("method", "calib_size", "seeds", "fp32_top1", "top1_mean",
                                       "top1_std")))
        by = {(r["method"], r["calib_size"]): r["top1_per_seed"] for r in summary}
        for (method, size), per_seed in sorted(by.items()):
            if "adaquant" not in method or ("minmax", size) not in by:
                continue
            mm = by[("minmax", size)]
            diffs = [per_seed[s] - mm[s] for s in per_seed if s in mm]
            wins = sum(d > 0 for d in diffs)
            print(f"size {size}: {method} - minmax per seed [{', '.join(f'{d:+.2f}' for d in diffs)}], "
                  f"{method} better on {wins}/{len(diffs)} seeds")


if __name__ == "__main__":
    main()
