#!/bin/bash
set -x
PY="/work/main/.venv/bin/python -m ptqkit.cli"
export PYTHONPATH=src OMP_NUM_THREADS=2
while kill -0 22220 2>/dev/null; do sleep 5; done
$PY bench --suite fmnist-resnet20 --deploy --w-bits 8 --a-bits 8 --json /tmp/i6/res/deploy-fmnist-resnet20-w8a8.json
$PY bench --suite fmnist-mobilenetv2 --deploy --w-bits 8 --a-bits 8 --json /tmp/i6/res/deploy-fmnist-mobilenetv2-w8a8.json
$PY bench --suite fmnist-resnet20 --deploy --w-bits 4 --a-bits 8 --json /tmp/i6/res/deploy-fmnist-resnet20-w4a8.json
$PY bench --suite fmnist-mobilenetv2 --deploy --w-bits 4 --a-bits 8 --json /tmp/i6/res/deploy-fmnist-mobilenetv2-w4a8.json
