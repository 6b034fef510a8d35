#!/usr/bin/env bash
# Training-step throughput and MFU of the gpu-small preset on one NVIDIA GPU: bf16
# autocast, SDPA flash attention, torch.compile. MFU is given against the matmul peak
# measured in the same run and against the datasheet dense bf16 peak of known GPUs.
#
#   bash benchmarks/gpu.sh                        # from the repository root, after `make install`
#   bash benchmarks/gpu.sh --steps 10             # more arguments go to `python -m benchmarks.mfu`
#   bash benchmarks/gpu.sh --device cpu --tiny    # smoke test of the same code without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec "$python" -m benchmarks.mfu --preset gpu-small --precision bf16 --compile "$@"
