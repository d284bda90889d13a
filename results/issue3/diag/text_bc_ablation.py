import sys, time, torch, fnmatch, copy
torch.set_num_threads(1)
from ptqkit.zoo.text import load_minilm, load_minilm_tokenizer, tweet_split, text_calibration, sentence_embedding
from ptqkit.pipeline import Recipe, quantize
from ptqkit.nn.modules import quant_layers
model=load_minilm(); tok=load_minilm_tokenizer(); split=tweet_split()
calib=text_calibration(split,tok,model,n=256,seed=0)
held=text_calibration(split,tok,model,n=128,seed=5)
with torch.no_grad(): fl=[sentence_embedding(model,b) for b in held]
def cos(q):
    with torch.no_grad():
        return float(torch.cat([torch.nn.functional.cosine_similarity(sentence_embedding(q,b),f,dim=-1) for b,f in zip(held,fl)]).mean())
wr=sys.argv[1] if len(sys.argv)>1 else "aciq"
base=dict(w_bits=4,a_bits=8,w_range=wr,a_range=wr)
q=quantize(model,calib,Recipe.from_dict(base),forward_fn=sentence_embedding)
qc=quantize(model,calib,Recipe.from_dict({**base,"steps":[{"name":"bias_correction","options":{"mode":"empirical"}}]}),forward_fn=sentence_embedding)
print(wr,"none",round(cos(q),4),"all",round(cos(qc),4))
L,LC=quant_layers(q),quant_layers(qc)
for pat in ["*.query","*.key","*.value","*.attention.output.dense","*.intermediate.dense","*.output.dense","encoder.layer.0.*","encoder.layer.[1-5].*"]:
    t=copy.deepcopy(q); T=quant_layers(t)
    with torch.no_grad():
        for n in T:
            if fnmatch.fnmatch(n,pat) and not (pat=="*.output.dense" and "attention" in n): T[n].bias.copy_(LC[n].bias)
    print(pat, round(cos(t),4), flush=True)
