#!/usr/bin/env bash
# CIFAR-10 and CIFAR-100 with ImageNet train as the wild pool (the paper's setting).
#   bash training.sh                      # both datasets, one GPU
#   NPROC=4 DATASETS=cifar100 bash training.sh
# Every path can be set from the environment; defaults follow the published README. Relative paths
# (and the default selected/, output/, teachers/) are taken from the folder you run the script in.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)   # this clone: its Python files are run, nothing is written into it

root_wild=${root_wild:-/data/imagenet/train}
root_cifar10=${root_cifar10:-/data/cifar10}
root_cifar100=${root_cifar100:-/data/cifar100}
teacher_cifar10=${teacher_cifar10:-teachers/cifar10_deit_base.pth}
teacher_cifar100=${teacher_cifar100:-teachers/cifar100_deit_base.pth}
selected_cifar10=${selected_cifar10:-selected/cifar10}
selected_cifar100=${selected_cifar100:-selected/cifar100}
output_student_cifar10=${output_student_cifar10:-output/cifar10}
output_student_cifar100=${output_student_cifar100:-output/cifar100}
NUM_SELECT=${NUM_SELECT:-650000}
NPROC=${NPROC:-1}
DATASETS=${DATASETS:-"cifar10 cifar100"}
EXTRA=${EXTRA:-}   # e.g. EXTRA="--compile --epochs 100"

PYTHON=${PYTHON:-python3}

launch() {   # launch SCRIPT ARGS...: this clone's SCRIPT, run from the caller's folder
  local script="$here/$1"; shift
  if [ "$NPROC" -gt 1 ]; then "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$script" "$@"
  else "$PYTHON" "$script" "$@"; fi
}

for dataset in $DATASETS; do
  case $dataset in
    cifar10)
      launch DFND_DeiT-train.py --dataset cifar10 --data_cifar "$root_cifar10" --data_imagenet "$root_wild" \
        --num_select "$NUM_SELECT" --teacher_dir "$teacher_cifar10" --selected_file "$selected_cifar10" \
        --output_dir "$output_student_cifar10" --nb_classes 10 --lr_S 7.5e-4 --attnprobe_sel --attnprobe_dist $EXTRA ;;
    cifar100)
      launch DFND_DeiT-train.py --dataset cifar100 --data_cifar "$root_cifar100" --data_imagenet "$root_wild" \
        --num_select "$NUM_SELECT" --teacher_dir "$teacher_cifar100" --selected_file "$selected_cifar100" \
        --output_dir "$output_student_cifar100" --nb_classes 100 --lr_S 8.5e-4 --attnprobe_sel --attnprobe_dist $EXTRA ;;
    *) echo "error: unknown dataset '$dataset' in DATASETS (cifar10, cifar100)" >&2; exit 2 ;;
  esac
done
