#!/usr/bin/env bash
# ImageNet with Flickr1M as the wild pool; adds the first 129 labeled train images per class
# (--pos_num 129), as published: NOT data-free.
#   NPROC=8 bash training_imagenet.sh
set -euo pipefail
cd "$(dirname "$0")"

root_wild=${root_wild:-/data/flickr1m}
root_imagenet=${root_imagenet:-/data/imagenet}     # train/ and val/ class folders
teacher_imagenet=${teacher_imagenet:-teachers/imagenet_deit_base_patch16_224.pth}
selected_imagenet=${selected_imagenet:-selected/imagenet}
output_student_imagenet=${output_student_imagenet:-output/imagenet}
TEACHER=${TEACHER:-deit_base_patch16_224}
STUDENT=${STUDENT:-deit_tiny_patch16_224}
NUM_SELECT=${NUM_SELECT:-650000}
POS_NUM=${POS_NUM:-129}
NPROC=${NPROC:-1}
EXTRA=${EXTRA:-}

PYTHON=${PYTHON:-python3}

launch() {
  if [ "$NPROC" -gt 1 ]; then "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$@"
  else "$PYTHON" "$@"; fi
}

launch DFND_DeiT-train.py --dataset imagenet --data_cifar "$root_imagenet" --data_imagenet "$root_wild" \
  --num_select "$NUM_SELECT" --teacher "$TEACHER" --student "$STUDENT" --teacher_dir "$teacher_imagenet" \
  --selected_file "$selected_imagenet" --output_dir "$output_student_imagenet" --nb_classes 1000 \
  --lr_S 5e-4 --pos_num "$POS_NUM" --attnprobe_sel --attnprobe_dist $EXTRA
