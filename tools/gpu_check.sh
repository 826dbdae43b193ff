#!/usr/bin/env bash
# One call on a GPU machine, at most 8 minutes on one H100/H200: the GPU tests, the main job for real
# (torchrun training with GPU and CPU decoding, a stop and exact resume, k-NN, a cached teacher), the GPU
# timings and the hours they imply. Every part runs under a hang guard with its own limit, the limits add
# up to the total, and $OUT/summary.md says after every part what ran, its figures and what was cut.
#
#   bash tools/gpu_check.sh          # results in $OUT (the device tool sets it) or /tmp/gpu_check
#   DRY=1 bash tools/gpu_check.sh    # rehearsal on any machine: every part on the CPU at toy sizes
#
# The parts, their limits and the files written: python -m tools.gpu_check --help and tools/gpu_check.py.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m tools.gpu_check "$@"
