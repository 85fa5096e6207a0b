#!/usr/bin/env bash
# ImageNet with Flickr1M as the wild pool, the published settings: 1,000,000 selected images,
# teacher deit_base_patch16_224 (the official DeiT release file), --lr_S 7.5e-4, CIFAR's mean/std for
# every image, and the first 129 labeled train images per class (--pos_num 129): NOT data-free.
# training_tinyimagenet.sh runs this with its own defaults.
#   NPROC=8 bash training_imagenet.sh
set -euo pipefail
cd "$(dirname "$0")"

DATASET=${DATASET:-imagenet}
root_wild=${root_wild:-/data/flickr1m}
root_data=${root_data:-/data/imagenet}     # train/ and val/ class folders
# the release file, or the same release as timm names it (loaded by timm, from the hub cache):
#   teacher_file=hf-hub:timm/deit_base_patch16_224.fb_in1k   (or the tag deit_base_patch16_224.fb_in1k)
teacher_file=${teacher_file:-teachers/imagenet_deit_base_patch16_224.pth}
selected=${selected:-selected/$DATASET}
output=${output:-output/$DATASET}
NB_CLASSES=${NB_CLASSES:-1000}
TEACHER=${TEACHER:-deit_base_patch16_224}
STUDENT=${STUDENT:-deit_tiny_patch16_224}
NUM_SELECT=${NUM_SELECT:-1000000}
POS_NUM=${POS_NUM:-129}
LR_S=${LR_S:-7.5e-4}
# the published DFND_DeiT-imagenet.py normalised every image with CIFAR's mean/std, with an ImageNet teacher
MEAN=${MEAN:-"0.4914 0.4822 0.4465"}
STD=${STD:-"0.2023 0.1994 0.2010"}
NPROC=${NPROC:-1}
EXTRA=${EXTRA:-}
PYTHON=${PYTHON:-python3}

launch() {
  if [ "$NPROC" -gt 1 ]; then "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$@"
  else "$PYTHON" "$@"; fi
}

launch DFND_DeiT-train.py --dataset "$DATASET" --data_cifar "$root_data" --data_imagenet "$root_wild" \
  --num_select "$NUM_SELECT" --teacher "$TEACHER" --student "$STUDENT" --teacher_dir "$teacher_file" \
  --selected_file "$selected" --output_dir "$output" --nb_classes "$NB_CLASSES" \
  --lr_S "$LR_S" --pos_num "$POS_NUM" --mean $MEAN --std $STD --attnprobe_sel --attnprobe_dist $EXTRA
