#!/bin/bash
# run from the worktree root
set -x
PY="/work/main/.venv/bin/python -m ptqkit.cli"
export PYTHONPATH=src OMP_NUM_THREADS=2
for S in fmnist-resnet20 fmnist-mobilenetv2; do
  $PY bench --suite $S --deploy --w-bits 8 --a-bits 8 --json /tmp/i6/res/deploy-$S-w8a8.json
  $PY bench --suite $S --methods minmax,percentile,mse,ort-minmax,ort-entropy,ort-percentile --w-bits 8 --a-bits 8 --json /tmp/i6/res/peer-$S-w8a8.json
  $PY bench --suite $S --deploy --w-bits 4 --a-bits 8 --json /tmp/i6/res/deploy-$S-w4a8.json
  $PY bench --suite $S --methods minmax,percentile,mse,ort-minmax,ort-entropy,ort-percentile --w-bits 4 --a-bits 8 --json /tmp/i6/res/peer-$S-w4a8.json
done
