"""Markdown tables from results/issue4/diag/*.json (diag_1img.py output): held-out KL / agreement /
top-1 per variant and seed, and the per-layer held-out MSE ratio grouped by output positions.

usage: python results/issue4/diag_table.py SUITE_PREFIX   (e.g. fmnist-mobilenetv2)
"""

from __future__ import annotations

import glob
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
LABELS = {"minmax": "start: MSE ranges (stored as 'minmax')", "minmax-ranges": "min-max ranges"}


def load(suite: str) -> list[dict]:
    rows: dict[tuple[int, str], dict] = {}
    for path in sorted(glob.glob(str(HERE / "diag" / "*.json"))):
        for r in json.loads(Path(path).read_text()):
            if r["suite"] == suite:
                rows[(r["seed"], r["variant"])] = r  # a later file repeats minmax: same numbers
    return list(rows.values())


def variant_table(rows: list[dict]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["seed"], r["variant"]): r for r in rows}
    out = ["| variant | " + " | ".join(f"seed {s} KL" for s in seeds)
           + " | mean KL | mean agreement % | mean top-1 (float) | layers worse (mean) |",
           "|---|" + "---|" * (len(seeds) + 4)]
    for v in variants:
        rs = [by.get((s, v)) for s in seeds]
        got = [r for r in rs if r]
        cells = [f"{r['heldout_kl']:.4f}" if r else "-" for r in rs]
        mean = lambda k: statistics.mean(r[k] for r in got)  # noqa: E731
        label = LABELS.get(v, v)
        out.append(f"| {label} | " + " | ".join(cells) + f" | {mean('heldout_kl'):.4f} | "
                   f"{mean('heldout_agreement'):.1f} | {mean('heldout_top1'):.1f} "
                   f"({mean('heldout_fp32_top1'):.1f}) | {mean('layers_worse_heldout'):.1f} |")
    return "\n".join(out)


def output_positions(suite: str) -> dict[str, int]:
    """Output positions per sample (H*W; 1 for the classifier) of every quantized layer."""
    import torch

    from ptqkit.nn.modules import quant_layers
    from ptqkit.pipeline import Recipe, quantize
    from ptqkit.zoo import load_model

    x = torch.zeros(1, 1, 28, 28)
    q = quantize(load_model(suite), x, Recipe(w_bits=4, a_bits=4))
    got: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: got.__setitem__(n, o[0, 0].numel()))
               for n, m in quant_layers(q).items()]
    with torch.no_grad():
        q(x)
    for h in handles:
        h.remove()
    return got


def layer_table(rows: list[dict], positions: dict[str, int]) -> str:
    sizes = sorted(set(positions.values()), reverse=True)
    variants = list(dict.fromkeys(r["variant"] for r in rows if r["variant"] != "minmax"))
    out = ["| variant | " + " | ".join(f"{p} positions" for p in sizes) + " |",
           "|---|" + "---|" * len(sizes)]
    for v in variants:
        cells = []
        for p in sizes:
            ratios = [ratio for r in rows if r["variant"] == v
                      for n, ratio in r["layer_heldout_ratio"].items() if positions[n] == p]
            cells.append(f"{statistics.mean(ratios):.2f} ({sum(x > 1 for x in ratios)}/{len(ratios)} worse)")
        out.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    rows = load(sys.argv[1])
    print(variant_table(rows))
    print("\nLayer MSE on held-out images, after / before (mean over layers and seeds), by output "
          "positions per image:\n")
    print(layer_table(rows, output_positions(sys.argv[1])))
