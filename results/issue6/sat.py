import torch, numpy as np, onnxruntime as ort, sys
import ptqkit
from ptqkit.zoo import fmnist_calibration, fmnist_test, load_model
from ptqkit.export.onnx import export_onnx
torch.set_num_threads(1)
x, y = fmnist_test(); x = x[:2000]; y = y[:2000]
calib = fmnist_calibration(1000, 0)
m = load_model("fmnist-resnet20")
for kw in [dict(w_symmetric=True), dict(w_bits=7, w_symmetric=True, first_last_8bit=False)]:
    q = ptqkit.quantize(m, calib, ptqkit.Recipe(**kw).with_steps("int_outputs"))
    export_onnx(q, "/tmp/i6/sat.onnx", x[:1])
    with torch.no_grad(): sim = torch.cat([q(c) for c in x.split(500)]).numpy()
    outs = {}
    for lvl in ("DISABLE_ALL", "ENABLE_ALL"):
        so = ort.SessionOptions(); so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, "ORT_" + lvl); so.log_severity_level = 3
        s = ort.InferenceSession("/tmp/i6/sat.onnx", so)
        outs[lvl] = np.concatenate([s.run(None, {"input": c.numpy()})[0] for c in x.split(500)])
    for k, o in outs.items():
        print(kw, k, "agree", (o.argmax(1) == sim.argmax(1)).mean(), "top1 onnx", (o.argmax(1) == y.numpy()).mean(), "sim", (sim.argmax(1) == y.numpy()).mean(), "maxdiff", np.abs(o - sim).max(), flush=True)
