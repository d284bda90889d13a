import sys, time, torch
torch.set_num_threads(1)
from ptqkit.zoo.text import load_minilm, load_minilm_tokenizer, tweet_split, text_calibration, sentence_embedding
from ptqkit.pipeline import Recipe, quantize, StepSpec
from ptqkit.calib.data import CalibrationData
t0=time.time()
model=load_minilm(); tok=load_minilm_tokenizer(); split=tweet_split()
calib=text_calibration(split,tok,model,n=int(sys.argv[1]) if len(sys.argv)>1 else 128,seed=0)
# held-out calibration-side check: another train draw (seed 5), never the test split
held=text_calibration(split,tok,model,n=128,seed=5)
print('load',time.time()-t0, [b['input_ids'].shape for b in calib.batches][:3])
with torch.no_grad():
    fl=[sentence_embedding(model,b) for b in held]
def cos(q):
    with torch.no_grad():
        return float(torch.cat([torch.nn.functional.cosine_similarity(sentence_embedding(q,b),f,dim=-1) for b,f in zip(held,fl)]).mean())
base=dict(w_bits=4,a_bits=8,w_range="aciq",a_range="aciq")
for label,steps in [("bc both",[StepSpec("bias_correction",{})])]:
    t=time.time(); q=quantize(model,calib,Recipe.from_dict({**base,"steps":[{"name":s.name,"options":s.options} for s in steps]}),forward_fn=sentence_embedding)
    print(label, round(cos(q),4), round(time.time()-t,1))
    from ptqkit.nn.modules import quant_layers
    print({n: q.report.layers[n]["bias_correction"] for n in list(quant_layers(q))[:8]})
