"""Deployment: ONNX QDQ export for ONNX Runtime (onnx.py), packed checkpoints (packed.py) and the
deployment benchmark (deploy_bench.py: latency, size, parity, ONNX Runtime's own quantizer as the
peer). The "int_outputs" step (ptqkit.algorithms.int_outputs) quantizes the conv outputs, residual
adds and pooling inputs ONNX Runtime needs to run the whole network in integer kernels.

Containers (ONNX Runtime 1.32, x86 CPU): activations uint8/int8 per tensor (b < 8 bits: Clip to the
b-bit grid + 8-bit QDQ); weights int8 per channel with zero-point 0 (symmetric, or asymmetric
b <= 7 bits stored exactly as q - z), uint8 with per-channel zero-points for asymmetric 8-bit
(exact, slower U8U8 path); bias int32 with scale s_x * s_w. INT4/UINT4 QDQ is valid ONNX and runs
in ONNX Runtime, but Conv is then not fused into an integer kernel, so 8-bit containers are used.
"""
