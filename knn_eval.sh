#!/usr/bin/env bash
# k-NN evaluation (the paper's 1-NN and 20-NN majority vote, with DINO's weighted vote beside it).
# Edit the variables below or set them in the environment:
#   DATA=/path/to/imagenet EXP_DIR=exp/r50_to_r18 EPOCH=130 bash knn_eval.sh
#   DATA=/path/to/imagenet WEIGHTS=simreg_r18.pth EXP_DIR=exp/released bash knn_eval.sh   # any checkpoint
# With DATA unset, evaluates the demo of `bash run.sh`: the distilled student, the demo teacher and the
# same student architecture at random initialisation, under the same protocol, side by side.
set -euo pipefail
cd "$(dirname "$0")"

DATA=${DATA:-}                       # dataset root with train/ and val/, ImageFolder layout
EXP_DIR=${EXP_DIR:-exp/r50_to_r18}   # results go to $EXP_DIR/features
EPOCH=${EPOCH:-}                     # empty: the latest checkpoint; N: checkpoints/ckpt_epoch_N.pth
WEIGHTS=${WEIGHTS:-}                 # a checkpoint file instead of the experiment's (any supported format)
ARCH=${ARCH:-}                       # empty: read from the checkpoint
TEACHER=${TEACHER:-}                 # also evaluate this teacher checkpoint (results in $EXP_DIR/teacher_eval)
RANDOM_INIT=${RANDOM_INIT:-0}        # 1: also evaluate ARCH_STUDENT at random initialisation
ARCH_STUDENT=${ARCH_STUDENT:-resnet18}
K=${K:-1,20}
BATCH_SIZE=${BATCH_SIZE:-512}        # global, split across GPUs
NUM_WORKERS=${NUM_WORKERS:-}         # loader processes per GPU; empty: 8, at most the CPU cores
NPROC=${NPROC:-gpu}                  # processes: gpu = every visible GPU (one process without GPUs), or a number
BACKEND=${BACKEND:-auto}             # torch (exact chunked GEMM) or faiss
EXTRA=${EXTRA:-}                     # any further flags, e.g. "--use_pred" or "--ties nearest"

# Demo settings (used only when DATA is unset).
DEMO_DIR=${DEMO_DIR:-demo_data}
DEMO_EXP=${DEMO_EXP:-exp/demo}
DEMO_SIZE=${DEMO_SIZE:-32}           # the digits are 32x32: no resize, no crop
DEMO_WORKERS=${DEMO_WORKERS:-0}       # in-process loading: fastest on 2 cores
DEMO_TEACHER=${DEMO_TEACHER:-timm/resnet10t}  # the demo teacher's network of run.sh
DEMO_STUDENT=${DEMO_STUDENT:-timm/resnet10t}  # the demo student of run.sh (its random-init baseline)

if [ -z "$DATA" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  ARCH_STUDENT=$DEMO_STUDENT
  TEACHER_FILE="$DEMO_EXP/teacher/demo_teacher_${DEMO_TEACHER//\//_}.pth"
  if [ ! -f "$DEMO_EXP/checkpoints/checkpoint_latest.pth" ] || [ ! -f "$TEACHER_FILE" ]; then
    echo "error: no finished demo in $DEMO_EXP; run 'bash run.sh' first" >&2
    exit 2
  fi
  DEMO_FLAGS="$DEMO_DIR --resize_size $DEMO_SIZE --crop_size $DEMO_SIZE -k $K --batch-size 256 --workers $DEMO_WORKERS --backend $BACKEND --device cpu"
  # The three evaluations in one process (torch and timm start once); each run is eval_knn.py's command line.
  python -m tools.run_many eval_knn.py \
    :: "distilled student ($DEMO_EXP)" $DEMO_FLAGS --exp_dir "$DEMO_EXP" $EXTRA \
    :: "the demo teacher ($TEACHER_FILE)" $DEMO_FLAGS --teacher --arch "$DEMO_TEACHER" --weights "$TEACHER_FILE" \
      --save "$DEMO_EXP/teacher/features" $EXTRA \
    :: "$ARCH_STUDENT at random initialisation" $DEMO_FLAGS --random_init --arch "$ARCH_STUDENT" \
      --save "$DEMO_EXP/random_init/features" $EXTRA
  python -m tools.eval_summary "teacher=$DEMO_EXP/teacher" "distilled student=$DEMO_EXP" \
    "random init=$DEMO_EXP/random_init"
  exit 0
fi

# Every visible GPU (one process per GPU); features are gathered in dataset order.
# tools.launch: torchrun for several processes; one process runs the script itself (a mistake is its one
# sentence with exit status 2 either way).
RUN=(python -m tools.launch --standalone --nproc_per_node "$NPROC" eval_knn.py "$DATA" -k "$K"
     --batch-size "$BATCH_SIZE" --backend "$BACKEND" ${NUM_WORKERS:+--workers "$NUM_WORKERS"})
"${RUN[@]}" --exp_dir "$EXP_DIR" ${EPOCH:+--epoch "$EPOCH"} ${WEIGHTS:+--weights "$WEIGHTS"} ${ARCH:+--arch "$ARCH"} $EXTRA
ROWS=("student=$EXP_DIR")
if [ -n "$TEACHER" ]; then
  "${RUN[@]}" --teacher --weights "$TEACHER" --save "$EXP_DIR/teacher_eval/features" $EXTRA
  ROWS=("teacher=$EXP_DIR/teacher_eval" "${ROWS[@]}")
fi
if [ "$RANDOM_INIT" = "1" ]; then
  "${RUN[@]}" --random_init --arch "$ARCH_STUDENT" --save "$EXP_DIR/random_init_eval/features" $EXTRA
  ROWS+=("random init=$EXP_DIR/random_init_eval")
fi
python -m tools.eval_summary "${ROWS[@]}"
