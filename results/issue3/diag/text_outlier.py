import torch
torch.set_num_threads(1)
from ptqkit.zoo.text import load_minilm, load_minilm_tokenizer, tweet_split, text_calibration, sentence_embedding
from ptqkit.pipeline import Recipe, quantize
from ptqkit.nn.modules import quant_layers
from ptqkit.calib.capture import record_io
from ptqkit.nn.control import quantizers_disabled
model=load_minilm(); tok=load_minilm_tokenizer(); split=tweet_split()
calib=text_calibration(split,tok,model,n=64,seed=0)
q=quantize(model,calib,Recipe.from_dict(dict(w_bits=4,a_bits=8,w_range="aciq",a_range="aciq")),forward_fn=sentence_embedding)
L=quant_layers(q); b=calib.batches[0]; m=b["attention_mask"].bool(); ids=b["input_ids"]
with quantizers_disabled(q), record_io(L) as st: sentence_embedding(q,b)
for n in ["encoder.layer.0.output.dense","encoder.layer.1.output.dense","encoder.layer.3.output.dense"]:
    l=L[n]; x=st[n][0]
    with torch.no_grad():
        y=l.op(x,l.weight,l.bias); e=l.op(x,l.w_quant(l.weight),l.bias)-y
    em=e[m]; c=int(em.mean(0).abs().argmax())
    print(n,"worst ch",c,"mean err",float(em[:,c].mean()),"y mean",float(y[m][:,c].mean()), "y absmax", float(y[m][:,c].abs().max()))
    # per token type
    for name,tid in [("CLS",101),("SEP",102)]:
        sel=(ids==tid)&m
        print("  ",name,"err mean",float(e[sel][:,c].mean()),"y",float(y[sel][:,c].mean()), "n",int(sel.sum()))
    other=m&(ids!=101)&(ids!=102)
    print("   other err mean",float(e[other][:,c].mean()),"median",float(e[other][:,c].median()),"y",float(y[other][:,c].mean()))
    w=l.weight[c].detach(); print("   weight row absmax",float(w.abs().max()),"std",float(w.std()),"clip hi",float(l.w_quant.range()[1][c]) if hasattr(l.w_quant,'range') else None)
    xa=x[m]; top=xa.abs().amax(0).topk(3); print("   input top dims",top.indices.tolist(),[round(float(v),1) for v in top.values])
