"""Train the Fashion-MNIST reference networks shipped in ptqkit.zoo.

Usage: python scripts/train_zoo.py fmnist-resnet20 [--epochs 7] [--threads 1]
Writes src/ptqkit/zoo/weights/<name>.safetensors and <name>.log (the log of this run).
Recipe: one-cycle SGD (max lr 0.1, momentum 0.9, nesterov, wd 5e-4), batch 128,
pad-2 random crop + horizontal flip, label smoothing 0.0. Seed 0.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ptqkit.zoo.fmnist import load_split
from ptqkit.zoo.models import FACTORIES

OUT = Path(__file__).resolve().parents[1] / "src" / "ptqkit" / "zoo" / "weights"


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), value=float(x.min()))
    dx, dy = torch.randint(0, 5, (2, n), generator=g)
    out = torch.stack([padded[i, :, dy[i]: dy[i] + 28, dx[i]: dx[i] + 28] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(int((model(x[i: i + 1000]).argmax(1) == y[i: i + 1000]).sum())
                  for i in range(0, len(x), 1000))
    return 100.0 * correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name", choices=sorted(FACTORIES))
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    xtr, ytr = load_split("train", args.data_dir)
    xte, yte = load_split("test", args.data_dir)
    model = FACTORIES[args.name]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = (len(xtr) + 127) // 128
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=args.epochs * steps_per_epoch)
    log = [f"# {args.name}: {sum(p.numel() for p in model.parameters())} params, "
           f"{args.epochs} epochs, torch {torch.__version__}, {args.threads} thread(s)"]
    print(log[0], flush=True)
    for epoch in range(args.epochs):
        model.train()
        t0, perm, total = time.time(), torch.randperm(len(xtr), generator=g), 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * 128: (i + 1) * 128]
            loss = F.cross_entropy(model(augment(xtr[idx], g)), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        acc = evaluate(model, xte, yte)
        log.append(f"epoch {epoch + 1}: train loss {total / steps_per_epoch:.4f}, "
                   f"test top-1 {acc:.2f}%, {time.time() - t0:.0f}s")
        print(log[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(OUT / f"{args.name}.safetensors"))
    (OUT / f"{args.name}.log").write_text("\n".join(log) + "\n")


if __name__ == "__main__":
    main()
