#!/usr/bin/env bash
# Tiny-ImageNet (64x64 teacher input is resized to the 224-px DeiT) with Flickr1M as the wild pool.
# Adds the first 50 labeled train images per class (--pos_num 50), as published: NOT data-free.
#   NPROC=4 bash training_tinyimagenet.sh
set -euo pipefail
cd "$(dirname "$0")"

root_wild=${root_wild:-/data/flickr1m}
root_tinyimagenet=${root_tinyimagenet:-/data/tiny-imagenet-200}   # after process_tinyimagenet.py + process_move_file.py
teacher_tinyimagenet=${teacher_tinyimagenet:-teachers/tinyimagenet_deit_base_patch16_224.pth}
selected_tinyimagenet=${selected_tinyimagenet:-selected/tinyimagenet}
output_student_tinyimagenet=${output_student_tinyimagenet:-output/tinyimagenet}
TEACHER=${TEACHER:-deit_base_patch16_224}
STUDENT=${STUDENT:-deit_tiny_patch16_224}
NUM_SELECT=${NUM_SELECT:-650000}
POS_NUM=${POS_NUM:-50}
NPROC=${NPROC:-1}
EXTRA=${EXTRA:-}

PYTHON=${PYTHON:-python3}

launch() {
  if [ "$NPROC" -gt 1 ]; then "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$@"
  else "$PYTHON" "$@"; fi
}

launch DFND_DeiT-train.py --dataset tinyimagenet --data_cifar "$root_tinyimagenet" --data_imagenet "$root_wild" \
  --num_select "$NUM_SELECT" --teacher "$TEACHER" --student "$STUDENT" --teacher_dir "$teacher_tinyimagenet" \
  --selected_file "$selected_tinyimagenet" --output_dir "$output_student_tinyimagenet" --nb_classes 200 \
  --lr_S 5e-4 --pos_num "$POS_NUM" --attnprobe_sel --attnprobe_dist $EXTRA
