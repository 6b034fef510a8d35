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
# $PYTHON (a path or a command), else the project's .venv, else python3
python="${PYTHON:-.venv/bin/python}"
if ! command -v "$python" >/dev/null 2>&1; then
    if [ -n "${PYTHON:-}" ]; then
        echo "gpu.sh: PYTHON=$PYTHON cannot be run: name an interpreter with torch installed" >&2
        exit 2
    fi
    python=python3
fi
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader ||
        echo "gpu.sh: nvidia-smi failed (is the NVIDIA driver loaded?)" >&2
fi
# on the GPU unless the arguments say otherwise (the last --device counts): without one, the step
# benchmark stops with an error rather than timing gpu-small on the CPU
exec "$python" -m benchmarks.mfu --preset gpu-small --precision bf16 --compile --device cuda "$@"
