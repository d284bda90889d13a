"""Bytes of the packed W4 checkpoint of the bench's deploy recipe, by part, and the bit-exact reload.

Run from the worktree root: PYTHONPATH=src python results/issue6/size_breakdown.py OUT.json
"""
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

import ptqkit
from ptqkit.bench import SUITES, BenchConfig
from ptqkit.export import packed
from ptqkit.export.deploy_bench import checkpoint_sizes, deploy_recipe
from ptqkit.nn.modules import quant_layers

torch.set_num_threads(1)
rows = {}
for name in ("fmnist-resnet20", "fmnist-mobilenetv2"):
    cfg = BenchConfig(w_bits=4, a_bits=8, calib_size=int(sys.argv[2]) if len(sys.argv) > 2 else 1000)
    suite = SUITES[name](cfg)
    calib = suite.calib(cfg.calib_size, cfg.seed)
    q = ptqkit.quantize(suite.float_model, calib, deploy_recipe(suite, cfg))
    out = Path(tempfile.mkdtemp())
    row = checkpoint_sizes(suite.float_model, q, out)
    path = out / "ptqkit.packed.safetensors"
    raw = path.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + hlen])
    row["file_parts"] = {"header (safetensors + ptqkit map)": 8 + hlen, **{
        k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}}
    parts = defaultdict(int)  # the stored tensors before bucketing / deflating, by kind
    for k, v in packed._packed_tensors(q, quant_layers(q)).items():
        kind = "weight.packed" if k.endswith(".packed") else ".".join(k.split(".")[-2:])
        kind = kind if kind.split(".")[0] in ("w_quant", "a_quant", "o_quant", "int_out", "weight") \
            else kind.split(".")[-1]
        parts[kind] += v.numel() * v.element_size()
    row["raw_tensor_parts"] = dict(sorted(parts.items(), key=lambda kv: -kv[1]))
    loaded = ptqkit.load(path, suite.float_model)
    with torch.no_grad():
        row["bit_identical_on_1000_test_images"] = bool(torch.equal(loaded(suite.x_test[:1000]),
                                                                     q(suite.x_test[:1000])))
    rows[name] = row
    print(name, json.dumps(row, indent=1), flush=True)
Path(sys.argv[1]).write_text(json.dumps(rows, indent=1) + "\n")
