#!/usr/bin/env bash
# SimReg distillation. Edit the variables below or set them in the environment:
#   DATA=/path/to/imagenet TEACHER=moco_v2_800ep_pretrain.pth.tar bash run.sh
# With DATA and TEACHER unset, runs the embedded demo (digits, a few minutes on a laptop CPU).
set -euo pipefail
cd "$(dirname "$0")"

DATA=${DATA:-}                       # dataset root with train/ (and val/), ImageFolder layout
TEACHER=${TEACHER:-}                 # teacher checkpoint file (MoCo, DINOv2, timm, torchvision, ...)
TEACHERS=${TEACHERS:-}               # several teacher files at once (multi-teacher SimReg); overrides TEACHER
ARCH_TEACHER=${ARCH_TEACHER:-}       # empty: read from the file (needed for byol_resnet50, timm/<name>, ...)
ARCH_STUDENT=${ARCH_STUDENT:-resnet18}
N_MLP_LAYERS=${N_MLP_LAYERS:-4}      # 4 = the paper's head, 2, 0 = linear predictor
EPOCHS=${EPOCHS:-130}
BATCH_SIZE=${BATCH_SIZE:-256}        # global, split across GPUs
LR=${LR:-0.05}
NUM_WORKERS=${NUM_WORKERS:-}         # loader processes per GPU; empty: 8, at most the CPU cores
NPROC=${NPROC:-gpu}                  # processes: gpu = every visible GPU (one process without GPUs), or a number
EXP_DIR=${EXP_DIR:-exp/r50_to_r18}
EXTRA=${EXTRA:-}                     # any further flags, e.g. "--channels_last --compile"

# Demo settings (used only when DATA is unset). Sized for 2 CPU cores without AVX-512: one torch thread
# and in-process data loading (two spinning threads plus loader workers ran up to 4x slower on 2 shared
# cores), and timm's ResNet-10-T (one block per stage: 2.4x ResNet-18's training rate at 32 px) as teacher
# and student. The teacher is supervised (AdamW: it leaves chance level in fewer epochs than SGD at 32 px);
# the student sees the teacher's own crops (at least 60% of the digit, never mirrored: the paper's 0.2
# minimum often crops a 32 px digit away, and a mirrored digit is another glyph). See docs/demo.md.
DEMO_DIR=${DEMO_DIR:-demo_data}
DEMO_EXP=${DEMO_EXP:-exp/demo}
DEMO_TEACHER_EPOCHS=${DEMO_TEACHER_EPOCHS:-6}
DEMO_EPOCHS=${DEMO_EPOCHS:-6}
DEMO_TEACHER=${DEMO_TEACHER:-timm/resnet10t}  # the demo teacher's network (torchvision or timm/<name>)
DEMO_STUDENT=${DEMO_STUDENT:-timm/resnet10t}
DEMO_AUG=${DEMO_AUG:---min_crop_scale 0.6 --no_flip}
DEMO_LR=${DEMO_LR:-0.4}
DEMO_BATCH=${DEMO_BATCH:-32}
DEMO_WORKERS=${DEMO_WORKERS:-0}
DEMO_THREADS=${DEMO_THREADS:-1}

if [ -z "$DATA" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$DEMO_THREADS}
  echo "== SimReg demo: digits on a 32x32 canvas (set DATA and TEACHER to distil on your data) =="
  python -m data.demo "$DEMO_DIR"
  TEACHER_FILE="$DEMO_EXP/teacher/demo_teacher_${DEMO_TEACHER//\//_}.pth"
  if [ -z "$TEACHERS" ] && [ ! -f "$TEACHER_FILE" ]; then
    echo "== 1/2 training the demo teacher (supervised $DEMO_TEACHER, saved in its public layout) =="
    python -m tools.pretrain_teacher "$DEMO_DIR" --arch "$DEMO_TEACHER" --epochs "$DEMO_TEACHER_EPOCHS" \
      --batch_size "$DEMO_BATCH" --optimizer adamw --learning_rate 0.002 --num_workers "$DEMO_WORKERS" \
      --out "$TEACHER_FILE"
  fi
  TEACHER_FLAGS="--arch_teacher $DEMO_TEACHER --teacher_weights $TEACHER_FILE"
  if [ -n "$TEACHERS" ]; then TEACHER_FLAGS="--teacher_weights $TEACHERS"; fi  # one head per teacher
  echo "== 2/2 distilling a $DEMO_STUDENT student with the paper's 4-layer head =="
  python train_student.py "$DEMO_DIR" $TEACHER_FLAGS --arch_student "$DEMO_STUDENT" \
    --n_mlp_layers "$N_MLP_LAYERS" --single_aug --weak_weak --image_size 32 $DEMO_AUG \
    --epochs "$DEMO_EPOCHS" --batch_size "$DEMO_BATCH" --learning_rate "$DEMO_LR" --save_freq 10 --print_freq 20 \
    --num_workers "$DEMO_WORKERS" --device cpu --exp_dir "$DEMO_EXP" $EXTRA
  echo "== demo finished: $DEMO_EXP (checkpoints/, logs/, checkpoints/student_backbone.pth) =="
  echo "training curves:"
  python -m tools.plot "$DEMO_EXP" --title "SimReg demo: $DEMO_TEACHER teacher -> $DEMO_STUDENT student"
  exit 0
fi

TEACHERS=${TEACHERS:-$TEACHER}
if [ -z "$TEACHERS" ]; then
  echo "error: DATA is set but TEACHER is not; set TEACHER to the teacher checkpoint file (or TEACHERS to several)" >&2
  exit 2
fi

# The paper's recipe on all visible GPUs (one process per GPU).
# tools.launch: torchrun for several processes; one process runs the script itself, so a mistake is its one
# sentence with exit status 2, and Ctrl-C or SIGTERM save a checkpoint (a second Ctrl-C aborts).
python -m tools.launch --standalone --nproc_per_node "$NPROC" train_student.py "$DATA" \
  ${ARCH_TEACHER:+--arch_teacher $ARCH_TEACHER} --arch_student "$ARCH_STUDENT" --teacher_weights $TEACHERS \
  --n_mlp_layers "$N_MLP_LAYERS" --learning_rate "$LR" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" \
  --single_aug --weak_weak --save_freq 10 ${NUM_WORKERS:+--num_workers "$NUM_WORKERS"} --exp_dir "$EXP_DIR" $EXTRA
