#!/usr/bin/env bash
# The paper's fine-tuning on every OOD cross_site site, from the released MedSegX weights.
set -euo pipefail
cd "$(dirname "$0")/.."
HELP_PYTHON=finetune.py source scripts/_help.sh
source scripts/_python.sh
"$MEDSEGX_PYTHON" finetune.py --checkpoint ./playground/SAM --model_type vit_b --data_path ./playground/MedSegDB/eval/OOD \
    --shift_type cross_site --device_ids ${DEVICE_IDS:-0} --num_epochs 30 --batch_size 64 --validation val \
    --resume ./playground/MedSegX/medsegx_vit_b.pth --lr 5e-5 --use_amp "$@"
