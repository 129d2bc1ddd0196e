#!/usr/bin/env bash
# The paper's internal (ID) evaluation of the released weights.
set -euo pipefail
cd "$(dirname "$0")/.."
HELP_PYTHON=evaluate_internal.py source scripts/_help.sh
source scripts/_python.sh
"$MEDSEGX_PYTHON" evaluate_internal.py --checkpoint ./playground/SAM --model_type vit_b \
    --model_weight ${MODEL_WEIGHT:-./playground/MedSegX/medsegx_vit_b.pth} \
    --data_path ${DATA_PATH:-./playground/MedSegDB/eval/ID} --metric dsc hd --device_ids ${DEVICE_IDS:-0} \
    --batch_size 32 "$@"
