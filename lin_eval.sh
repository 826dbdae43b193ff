#!/usr/bin/env bash
# Linear evaluation, the paper's protocol: frozen backbone, fixed standardisation, 40 epochs of SGD;
# the reported number is the last epoch's val top-1. Edit the variables below or set them in the environment:
#   DATA=/path/to/imagenet EXP_DIR=exp/r50_to_r18 EPOCH=130 bash lin_eval.sh
#   DATA=/path/to/imagenet EXP_DIR=exp/r50_to_r18 USE_CACHE=1 bash lin_eval.sh   # fast, on cached features
# With DATA unset, evaluates the demo of `bash run.sh`: the distilled student, the demo teacher and the
# same student architecture at random initialisation, under the same protocol, side by side.
set -euo pipefail
cd "$(dirname "$0")"

DATA=${DATA:-}                       # dataset root with train/ and val/, ImageFolder layout
EXP_DIR=${EXP_DIR:-exp/r50_to_r18}   # results go to $EXP_DIR/linear (linear_cached with USE_CACHE=1)
EPOCH=${EPOCH:-}                     # empty: the latest checkpoint; N: checkpoints/ckpt_epoch_N.pth
WEIGHTS=${WEIGHTS:-}                 # a checkpoint file instead of the experiment's (any supported format)
ARCH=${ARCH:-}                       # empty: read from the checkpoint
TEACHER=${TEACHER:-}                 # also evaluate this teacher checkpoint (results in $EXP_DIR/teacher_eval)
RANDOM_INIT=${RANDOM_INIT:-0}        # 1: also evaluate ARCH_STUDENT at random initialisation
ARCH_STUDENT=${ARCH_STUDENT:-resnet18}
EPOCHS=${EPOCHS:-40}
BATCH_SIZE=${BATCH_SIZE:-256}        # global, split across GPUs
LR=${LR:-0.01}
USE_CACHE=${USE_CACHE:-0}            # 1: train on cached centre-crop features (no augmentation, much faster)
NUM_WORKERS=${NUM_WORKERS:-}         # loader processes per GPU; empty: 8, at most the CPU cores
NPROC=${NPROC:-gpu}                  # processes: gpu = every visible GPU (one process without GPUs), or a number
EXTRA=${EXTRA:-}                     # any further flags, e.g. "--use_pred"

# Demo settings (used only when DATA is unset).
DEMO_DIR=${DEMO_DIR:-demo_data}
DEMO_EXP=${DEMO_EXP:-exp/demo}
DEMO_SIZE=${DEMO_SIZE:-32}           # the digits are 32x32: no resize, no centre crop
# Random crops of at least 60% of a 32 px digit and no flip (a mirrored digit is another glyph);
# the paper's 0.08 minimum on 224 px ImageNet images would often crop the digit away.
DEMO_AUG=${DEMO_AUG:---min_crop_scale 0.6 --no_flip}
DEMO_WORKERS=${DEMO_WORKERS:-0}       # in-process loading: fastest on 2 cores
DEMO_TEACHER=${DEMO_TEACHER:-timm/resnet10t}  # the demo teacher's network of run.sh
DEMO_STUDENT=${DEMO_STUDENT:-timm/resnet10t}  # the demo student of run.sh (its random-init baseline)
DEMO_USE_CACHE=${DEMO_USE_CACHE:-1}  # the demo probes cached features (seconds); 0: augmented crops (minutes)

CACHE_FLAG=""
LINEAR_DIR=linear                    # cached-feature probes go to linear_cached/ (another protocol)
if [ -z "$DATA" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  ARCH_STUDENT=$DEMO_STUDENT
  TEACHER_FILE="$DEMO_EXP/teacher/demo_teacher_${DEMO_TEACHER//\//_}.pth"
  if [ ! -f "$DEMO_EXP/checkpoints/checkpoint_latest.pth" ] || [ ! -f "$TEACHER_FILE" ]; then
    echo "error: no finished demo in $DEMO_EXP; run 'bash run.sh' first" >&2
    exit 2
  fi
  if [ "$DEMO_USE_CACHE" = "1" ]; then CACHE_FLAG="--use_cache"; LINEAR_DIR=linear_cached; fi
  DEMO_FLAGS="$DEMO_DIR --resize_size $DEMO_SIZE --crop_size $DEMO_SIZE $DEMO_AUG --epochs $EPOCHS --lr $LR --batch-size 256 --workers $DEMO_WORKERS --device cpu $CACHE_FLAG"
  # The three probes in one process (torch and timm start once); each run is eval_linear.py's command line.
  python -m tools.run_many eval_linear.py \
    :: "distilled student ($DEMO_EXP)" $DEMO_FLAGS --exp_dir "$DEMO_EXP" $EXTRA \
    :: "the demo teacher ($TEACHER_FILE)" $DEMO_FLAGS --teacher --arch "$DEMO_TEACHER" --weights "$TEACHER_FILE" \
      --save "$DEMO_EXP/teacher/$LINEAR_DIR" $EXTRA \
    :: "$ARCH_STUDENT at random initialisation" $DEMO_FLAGS --random_init --arch "$ARCH_STUDENT" \
      --save "$DEMO_EXP/random_init/$LINEAR_DIR" $EXTRA
  python -m tools.eval_summary "teacher=$DEMO_EXP/teacher" "distilled student=$DEMO_EXP" \
    "random init=$DEMO_EXP/random_init"
  exit 0
fi

if [ "$USE_CACHE" = "1" ]; then CACHE_FLAG="--use_cache"; LINEAR_DIR=linear_cached; fi
# Every visible GPU (one process per GPU); with USE_CACHE=1 the probe itself trains on one GPU.
# tools.launch: torchrun for several processes; one process runs the script itself (a mistake is its one
# sentence with exit status 2 either way).
RUN=(python -m tools.launch --standalone --nproc_per_node "$NPROC" eval_linear.py "$DATA" --epochs "$EPOCHS"
     --lr "$LR" --batch-size "$BATCH_SIZE" $CACHE_FLAG ${NUM_WORKERS:+--workers "$NUM_WORKERS"})
"${RUN[@]}" --exp_dir "$EXP_DIR" ${EPOCH:+--epoch "$EPOCH"} ${WEIGHTS:+--weights "$WEIGHTS"} ${ARCH:+--arch "$ARCH"} $EXTRA
ROWS=("student=$EXP_DIR")
if [ -n "$TEACHER" ]; then
  "${RUN[@]}" --teacher --weights "$TEACHER" --save "$EXP_DIR/teacher_eval/$LINEAR_DIR" $EXTRA
  ROWS=("teacher=$EXP_DIR/teacher_eval" "${ROWS[@]}")
fi
if [ "$RANDOM_INIT" = "1" ]; then
  "${RUN[@]}" --random_init --arch "$ARCH_STUDENT" --save "$EXP_DIR/random_init_eval/$LINEAR_DIR" $EXTRA
  ROWS+=("random init=$EXP_DIR/random_init_eval")
fi
python -m tools.eval_summary "${ROWS[@]}"
