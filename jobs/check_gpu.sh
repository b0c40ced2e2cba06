#!/usr/bin/env bash
# Check the device data plane on a GPU machine, in one command (under 8 minutes):
#
#     jobs/check_gpu.sh [--out results/check_gpu.json] [--bytes 256MiB]
#
# kernel tests against their fallbacks (test_kernels, test_nccl, test_arena, test_device_plane with CUDA), a
# 1-rank NCCL loopback of the data transport, a 2-rank fedavg_ round on one GPU over a CUDA-aware MPI when the
# machine has one (NCCL refuses two ranks on one GPU; said so otherwise), device BLAKE3 / pack / accumulate
# bandwidth against the device-to-device copy (goal >= 90%).  Writes one JSON, prints a short table.
# Exit: 0 every check that ran passed, 1 a check failed, 2 no torch, 3 no GPU here (nothing checked).
# PYTHON (default: python) is the interpreter with torch, mpi4py and (for NCCL and the .cu kernels) CuPy.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "check_gpu: $PY cannot import torch (set PYTHON to the project's interpreter)" >&2
    exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "check_gpu: no GPU here (torch.cuda.is_available() is False): nothing checked" >&2
    exit 3
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 "$PY" "$ROOT/jobs/check_gpu.py" "$@"
