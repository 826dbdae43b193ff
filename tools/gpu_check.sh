#!/usr/bin/env bash
# One call on a GPU machine (expected about 6 minutes on one H100/H200 with 16 cores, not measured yet; the
# parts' time limits add up to under 8 minutes): the GPU tests, then three profiles of tools.benchmark: the
# main job for real (main_job: torchrun train_student.py with --decode gpu and the CPU decoder, a mid-run
# stop and resume, eval_knn.py with torch and faiss, a cached-teacher run), the GPU timings (gpu), and the
# projection to hours for the paper's runs (hours).
#
#   bash tools/gpu_check.sh          # results in $OUT (the device tool sets it) or /tmp/gpu_check
#   DRY=1 bash tools/gpu_check.sh    # rehearsal on any machine: every part on the CPU at toy sizes
#
# Writes to $OUT: env.txt (card, driver, versions), gpu_tests.log, main_job.json + main_job.log,
# bench_gpu.json + bench_gpu.log (the rows BENCHMARKS.md's GPU section is filled from) and projection.md.
# Each part has its own time limit, so a hang in one still leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
WORK=${WORK:-/tmp/simreg_bench}  # generated JPEGs and caches, shared by the main job and the benchmark
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY_FLAG=${DRY:+--dry_run}
SCALE=1  # the time limits' multiplier
if [ -n "${DRY:-}" ]; then
  export OMP_NUM_THREADS=1  # the rehearsal runs several processes on a few CPU cores
  export CUDA_VISIBLE_DEVICES=""
  SCALE=4  # a shared CPU starts a Python process with torch in 5-15 s: limits sized for the GPU would cut it
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || echo "no nvidia-smi"
  echo "cpu cores: $(env -u OMP_NUM_THREADS nproc)"
  df -h /dev/shm "$WORK"  # the loaders' batches travel through shared memory; the caches need disk
  timeout 30 $PY - <<'EOF'
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
for name in ("nvidia.dali", "faiss"):
    try:
        mod = __import__(name, fromlist=["_"])
        gpus = f", gpus {mod.get_num_gpus()}" if name == "faiss" else ""
        print(name, mod.__version__ + gpus)
    except ImportError:
        print(name, "not installed")
EOF
} 2>&1 | tee "$OUT/env.txt"

# GPU numerics: device decoding vs the CPU, one training step with --decode gpu, bf16 + channels_last +
# folded compiled teacher + fused SGD vs fp32 (on a CPU these are skipped in a few seconds).
timeout $((60 * SCALE)) $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_device_decode.py tests/test_fast_step.py 2>&1 \
  | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# The main job for real; its parts have their own limits inside (about 2.5 minutes in all on one GPU).
timeout $((180 * SCALE)) $PY -m tools.benchmark main_job $DRY_FLAG --json "$OUT/main_job.json" --work_dir "$WORK" 2>&1 \
  | tail -n 25
job_rc=${PIPESTATUS[0]}

timeout $((180 * SCALE)) $PY -m tools.benchmark gpu $DRY_FLAG --json "$OUT/bench_gpu.json" --work_dir "$WORK" 2>&1 \
  | tee "$OUT/bench_gpu.log" | tail -n 40
bench_rc=${PIPESTATUS[0]}

timeout $((10 * SCALE)) $PY -m tools.benchmark hours --rows "$OUT/bench_gpu.json" "$OUT/main_job.json" \
  --summary "$OUT/projection.md"
hours_rc=$?

echo "gpu tests exit ${tests_rc}, main job exit ${job_rc}, benchmark exit ${bench_rc}, projection exit ${hours_rc}"
exit $(( tests_rc != 0 || job_rc != 0 || bench_rc != 0 || hours_rc != 0 ))
