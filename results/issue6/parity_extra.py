"""Extra parity rows: plain recipes (no int_outputs) exported as-is; W8A8 asymmetric (uint8 weights), W4A4."""
import sys, json, torch, tempfile
from pathlib import Path
import ptqkit
from ptqkit.zoo import fmnist_calibration, fmnist_test, load_model
from ptqkit.export.onnx import export_onnx
from ptqkit.export.deploy_bench import parity, integer_kernels
torch.set_num_threads(2)
x, y = fmnist_test(); calib = fmnist_calibration(1000, 0)
rows = []
for S in sys.argv[1].split(","):
    m = load_model(S)
    for kw in (dict(w_bits=8, a_bits=8), dict(w_bits=8, a_bits=8, w_symmetric=True), dict(w_bits=4, a_bits=4)):
        q = ptqkit.quantize(m, calib, ptqkit.Recipe(**kw))
        with tempfile.TemporaryDirectory() as t:
            info = export_onnx(q, Path(t) / "m.onnx", x[:1])
            r = {"suite": S, **kw, "recipe": "mse ranges (default), no int_outputs", **parity(q, info.path, x, y), "kernels": integer_kernels(info.path)}
        print(json.dumps(r), flush=True); rows.append(r)
json.dump(rows, open(sys.argv[2], "w"), indent=1)
