#!/bin/bash
set -x
PY="/work/main/.venv/bin/python -m ptqkit.cli"
export PYTHONPATH=src OMP_NUM_THREADS=1
$PY bench --suite fmnist-resnet20 --methods minmax,percentile,mse,ort-minmax,ort-entropy,ort-percentile --w-bits 4 --a-bits 8 --json /tmp/i6/res/peer-fmnist-resnet20-w4a8.json
$PY bench --suite fmnist-mobilenetv2 --methods minmax,percentile,mse,ort-minmax,ort-entropy,ort-percentile --w-bits 8 --a-bits 8 --json /tmp/i6/res/peer-fmnist-mobilenetv2-w8a8.json
$PY bench --suite fmnist-mobilenetv2 --methods minmax,percentile,mse,ort-minmax,ort-entropy,ort-percentile --w-bits 4 --a-bits 8 --json /tmp/i6/res/peer-fmnist-mobilenetv2-w4a8.json
/work/main/.venv/bin/python /tmp/i6/parity_extra.py fmnist-resnet20,fmnist-mobilenetv2 /tmp/i6/res/parity-extra.json
