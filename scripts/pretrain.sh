#!/usr/bin/env bash
# The paper's pre-training: ViT-B, 8 GPUs, global batch 1024, 30 epochs, AMP.
set -euo pipefail
cd "$(dirname "$0")/.."
HELP_PYTHON=pretrain.py source scripts/_help.sh
source scripts/_python.sh
"$MEDSEGX_PYTHON" pretrain.py --checkpoint ./playground/SAM --model_type vit_b --data_path ./playground/MedSegDB \
    --device_ids ${DEVICE_IDS:-0 1 2 3 4 5 6 7} --num_epochs 30 --batch_size ${BATCH_SIZE:-1024} --lr ${LR:-1e-3} \
    --use_amp "$@"
