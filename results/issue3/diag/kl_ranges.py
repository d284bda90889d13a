"""Calibration-only diagnostic (never the test split). End-to-end KL to float logits on calibration data (fit on 256 train images, KL on a second
train draw of $HELD images, default 1000, calibration seed 1) for weight/activation range combinations."""
import sys, torch, functools, itertools
torch.set_num_threads(1)
from ptqkit.zoo import load_model, fmnist_calibration
from ptqkit.pipeline import Recipe, quantize
from ptqkit import ranges as R
from ptqkit.ranges.aciq import aciq_range
import ptqkit.algorithms.range_init as RI
name=sys.argv[1]; bits=int(sys.argv[2]); wb=int(sys.argv[3]) if len(sys.argv)>3 else bits
model=load_model(name); calib=fmnist_calibration(256,0); held=fmnist_calibration(int(__import__("os").environ.get("HELD","1000")),1)
R.RANGE_METHODS["aciq_lap"]=functools.partial(aciq_range,prior="laplace")
R.RANGE_METHODS["aciq_gau"]=functools.partial(aciq_range,prior="gaussian")
with torch.no_grad():
    fl=torch.cat([model(b) for b in held.batches]).log_softmax(-1)
def kl(q):
    with torch.no_grad():
        lq=torch.cat([q(b) for b in held.batches]).log_softmax(-1)
    return float((fl.exp()*(fl-lq)).sum(-1).mean()), float((lq.argmax(-1)==fl.argmax(-1)).float().mean()*100)
ms=sys.argv[4].split(",") if len(sys.argv)>4 else ["minmax","mse","aciq","aciq_lap","aciq_gau"]
for w in ms:
    for a in ms:
        rec=Recipe(w_bits=wb,a_bits=bits)
        # bypass Recipe validation of names: set options of the ranges step directly
        opts=RI.RangeOptions.__new__(RI.RangeOptions)
        q=quantize(model,calib,rec.__class__.from_dict({**rec.to_dict(),"w_range":"minmax","a_range":"minmax"}))
        from ptqkit.algorithms.base import Context, Report
        ctx=Context(q,calib,Report())
        o=RI.RangeOptions(weights="minmax",activations="minmax"); object.__setattr__(o,"weights",w); object.__setattr__(o,"activations",a)
        RI.init_weight_ranges(ctx,o); RI.init_activation_ranges(ctx,o)
        k,agr=kl(q); print(f"W {w:9s} A {a:9s} KL {k:.4f} agree {agr:.2f}",flush=True)
