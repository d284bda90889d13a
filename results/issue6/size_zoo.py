import torch, os
import ptqkit
from safetensors.torch import save_file
from ptqkit.zoo import fmnist_calibration, load_model, fmnist_test
from ptqkit.zoo.models import FACTORIES
torch.set_num_threads(1)
calib = fmnist_calibration(1000, 0); x, _ = fmnist_test(); x = x[:1000]
for S in ("fmnist-resnet20", "fmnist-mobilenetv2"):
    m = load_model(S); save_file(m.state_dict(), f"/tmp/i6/{S}.float.safetensors")
    q = ptqkit.quantize(m, calib, ptqkit.Recipe(w_bits=4, a_bits=8, w_range="minmax", a_range="minmax"))
    ptqkit.save(q, f"/tmp/i6/{S}.w4.safetensors"); q2 = ptqkit.load(f"/tmp/i6/{S}.w4.safetensors", FACTORIES[S])
    with torch.no_grad(): eq = torch.equal(q(x), q2(x))
    fb, pb = os.path.getsize(f"/tmp/i6/{S}.float.safetensors"), os.path.getsize(f"/tmp/i6/{S}.w4.safetensors")
    print(S, "W4A8 minmax packed", pb, "float", fb, "ratio", round(pb / fb, 4), "bit-identical on 1000 test images:", eq, flush=True)
