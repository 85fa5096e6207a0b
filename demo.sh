#!/usr/bin/env bash
# Fashion-MNIST in the wild, end to end (see docs/demo.md):
#   ./demo.sh                          default preset: mismatch pool, one seed, <= 20 min on 2 CPU cores
#   ./demo.sh --seeds 0 1 2            3 seeds (a teacher and 7 students each): mean ± sd of every column
#   ./demo.sh --pool far-ood           held-out images + made images, 10-class teacher
#   ./demo.sh --full --device cuda     both pools, relevant share 0.2 and 0.6, 2 seeds (one GPU)
#   ./demo.sh --ablation pd            selection x probe distillation: both pools, 3 seeds, 8 rules
# Results: $OUT (default runs/demo)/results.md, results.json, results_<pool>.json, figures/*.png
set -euo pipefail
cd "$(dirname "$0")"
FMNIST=${FMNIST:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-runs/demo}
# the test command's venv when it exists, else the system Python
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}   # see demo.py: spinning OpenMP threads stall on shared cores

have_idx() { [ -e "$1/train-images-idx3-ubyte.gz" ] || [ -e "$1/train-images-idx3-ubyte" ]; }
if ! have_idx "$FMNIST"; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Fashion-MNIST missing: installing the Debian package dataset-fashion-mnist"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
  fi
  if ! have_idx "$FMNIST"; then
    echo "Fashion-MNIST not found in $FMNIST. Install it (sudo apt-get install dataset-fashion-mnist)" >&2
    echo "or set FMNIST=DIR to a folder with the four IDX files (train/t10k images and labels)." >&2
    exit 1
  fi
fi
if ! "$PYTHON" -c "import torch, torchvision, timm, numpy, PIL, tqdm, safetensors, matplotlib" 2>/dev/null; then
  # a venv: Debian's system Python refuses pip installs (PEP 668)
  echo "installing the Python requirements into .venv (requirements.txt)"
  if ! python3 -c "import ensurepip" 2>/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
  fi
  python3 -m venv --system-site-packages .venv && .venv/bin/pip install -r requirements.txt
  PYTHON=.venv/bin/python
fi
exec "$PYTHON" demo/demo.py --fmnist "$FMNIST" --out "$OUT" "$@"
