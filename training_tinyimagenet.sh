#!/usr/bin/env bash
# Tiny-ImageNet (64-px images resized to the 224-px DeiT) with Flickr1M as the wild pool, the
# published settings: 800,000 selected images, teacher deit_small_patch16_224, 200 classes,
# --lr_S 7.5e-4, CIFAR's mean/std for every image (the published 224-px script used CIFAR statistics with
# an ImageNet teacher; set in training_imagenet.sh), and the first 50 labeled train images per class
# (--pos_num 50): NOT data-free.
# Run process_tinyimagenet.py and process_move_file.py on the dataset first.
#   NPROC=4 bash training_tinyimagenet.sh      (every variable of training_imagenet.sh can be set)
set -euo pipefail
export DATASET=tinyimagenet
export root_data=${root_data:-/data/tiny-imagenet-200}
# a Tiny-ImageNet fine-tune of deit_small_patch16_224; one on the hub loads as teacher_file=hf-hub:org/name
export teacher_file=${teacher_file:-teachers/tinyimagenet_deit_small_patch16_224.pth}
export TEACHER=${TEACHER:-deit_small_patch16_224}
export NB_CLASSES=${NB_CLASSES:-200}
export NUM_SELECT=${NUM_SELECT:-800000}
export POS_NUM=${POS_NUM:-50}
exec bash "$(dirname "$0")/training_imagenet.sh" "$@"
