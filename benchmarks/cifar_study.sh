#!/usr/bin/env bash
# The CPU-scale CIFAR-10 study of docs/RESULTS.md, end to end:
#   bash benchmarks/cifar_study.sh [ROOT] [SEEDS]       (defaults: study, "0 1")
# Needs the JPEG copy of CIFAR-10 (DATA, default ../shared/data/cifar10-jpeg). Every step resumes:
# run it again after an interruption and finished runs are skipped. Seeds run one after another;
# to use two cores, start one copy per seed (bash benchmarks/cifar_study.sh study 0 & ... study 1).
set -euo pipefail
ROOT=${1:-study}
SEEDS=${2:-"0 1"}
DATA=${DATA:-../shared/data/cifar10-jpeg}
# The papers' CIFAR-10 ResNet-18 recipe (preset family: lr 0.05 cosine, momentum 0.9, rho 0.1,
# weight decay 5e-4 SGD / 1e-3 SAM+SSAM, crop+flip+Cutout, Fisher Ns=128 and masks every epoch),
# scaled to 2 CPU cores: 5,000 training images (500 per class), the full 10,000-image test set,
# width 8, 10 epochs.
COMMON=(--family cifar10-resnet18 --data "$DATA" --train-subset 5000 --width 8 --epochs 10
        --threads 1 --no-progress --no-report)
for S in $SEEDS; do
  sparsam sweep --root "$ROOT/runs/unstructured" --methods sgd,sam,ssam-f,ssam-d,ssam-n \
      --sparsities 0.5,0.9,0.99 --seeds "$S" "${COMMON[@]}"
  sparsam sweep --root "$ROOT/runs/structured" --methods ssam-f --sparsities 0.5 \
      --pattern structured --granularity tensor --seeds "$S" "${COMMON[@]}"
  sparsam sweep --root "$ROOT/runs/nm" --methods ssam-f --sparsities 0.5 --pattern nm --nm 2:4 \
      --seeds "$S" "${COMMON[@]}"
done
sparsam report "$ROOT/runs" --out "$ROOT/report" --title "CIFAR-10, ResNet-18 width 8, 5k images, 10 epochs"
# Hessian top eigenvalue, SAM sharpness and a 1-D landscape of every final model, on the same
# 256 test images and seed (one report per seed keeps the landscape figure readable).
for S in $SEEDS; do
  sparsam analyze "$ROOT"/runs/*/*-seed"$S" --out "$ROOT/analysis-seed$S" --batch-size 256 \
      --threads 1 --formats png --quiet
done
python "$(dirname "$0")/study_table.py" "$ROOT"
