"""Per-layer weight / activation quantization MSE (relative, as SQNR dB) on CALIBRATION data, W3A3."""
import sys, torch, math
torch.set_num_threads(1)
from ptqkit.zoo import load_model, fmnist_calibration
from ptqkit.pipeline import Recipe, quantize
from ptqkit.nn.modules import quant_layers
from ptqkit.calib.capture import collect_input_samples
from ptqkit.nn.control import quantizers_disabled
from ptqkit.core.spec import QuantSpec
from ptqkit.core.primitives import qparams_from_range, fake_quantize
from ptqkit.ranges import RANGE_METHODS
from ptqkit.ranges.aciq import fit_prior, _prefers_laplace
name=sys.argv[1]; bits=int(sys.argv[2])
model=load_model(name); calib=fmnist_calibration(256,0)
q=quantize(model,calib,Recipe(w_bits=bits,a_bits=bits,w_range="minmax",a_range="minmax"))
layers=quant_layers(q)
with quantizers_disabled(q):
    samples=collect_input_samples(q,layers,calib,1<<16,0)
def sqnr(x,lo,hi,spec):
    s,z=qparams_from_range(lo,hi,spec)
    e=(fake_quantize(x,s,z,spec)-x).pow(2).sum(); return 10*math.log10(float(x.pow(2).sum()/e))
meths=["minmax","mse","aciq","aciq_lap","aciq_gau"]
def rng(m,x,spec):
    if m=="aciq_lap": return RANGE_METHODS["aciq"](x,spec,prior="laplace")
    if m=="aciq_gau": return RANGE_METHODS["aciq"](x,spec,prior="gaussian")
    return RANGE_METHODS[m](x,spec)
print("layer wbits | W sqnr:", meths, "| A sqnr:", meths, "| A onesided frac0, auto-lap")
tot={m:[0,0] for m in meths}
for n,l in layers.items():
    w=l.weight.detach().reshape(l.out_channels,-1); ws=l.w_quant.spec
    wr=[sqnr(w,*rng(m,w,ws),ws) for m in meths]
    x=samples[n].reshape(1,-1); asp=l.a_quant.spec
    ar=[sqnr(x,*rng(m,x,asp),asp) for m in meths]
    os_=bool((x>=0).all()); fit=fit_prior(x,os_)
    for i,m in enumerate(meths): tot[m][0]+=wr[i]; tot[m][1]+=ar[i]
    print(f"{n:28s} {ws.bits} | "+" ".join(f"{v:5.1f}" for v in wr)+" | "+" ".join(f"{v:5.1f}" for v in ar)+f" | {os_} {float((x==0).float().mean()):.2f} {bool(_prefers_laplace(fit,os_)[0])}")
print("sum", {m:(round(a,1),round(b,1)) for m,(a,b) in tot.items()})
