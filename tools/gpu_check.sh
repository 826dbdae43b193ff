#!/usr/bin/env bash
# One call on a GPU machine (about 6 minutes on one H100): the GPU tests, then the GPU benchmark profile.
#
#   bash tools/gpu_check.sh            # results in $OUT (the device tool sets it) or /tmp/gpu_check
#   DRY=1 bash tools/gpu_check.sh      # rehearsal on any machine: toy sizes, every code path (about 30 s)
#
# Writes $OUT/env.txt (card, driver, versions), $OUT/gpu_tests.log, $OUT/bench_gpu.log and
# $OUT/bench_gpu.json (the rows BENCHMARKS.md's H100 table is filled from). Each part has its own
# time limit, so a hang in one still leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || echo "no nvidia-smi"
  nproc
  df -h /dev/shm  # the loaders' batches travel through shared memory (the baseline's: 2 x 154 MB each)
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  $PY -c "import nvidia.dali as d; print('dali', d.__version__)" 2>/dev/null || echo "dali: not installed"
  $PY -c "import faiss; print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus())" 2>/dev/null || echo "faiss: not installed"
} 2>&1 | tee "$OUT/env.txt"

# GPU numerics: batched nvJPEG decode vs CPU, bf16 + channels_last + folded compiled teacher + fused SGD vs fp32.
timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_decode.py tests/test_fast_step.py 2>&1 \
  | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 420 $PY -m tools.benchmark --profile gpu ${DRY:+--dry_run} --json "$OUT/bench_gpu.json" --work_dir /tmp/simreg_bench 2>&1 \
  | tee "$OUT/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}

echo "gpu tests exit ${tests_rc}, benchmark exit ${bench_rc}"
exit $(( tests_rc != 0 || bench_rc != 0 ))
