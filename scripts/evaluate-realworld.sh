#!/usr/bin/env bash
# The paper's external evaluation on eval/RealWorld, cross-site then cross-task.
set -euo pipefail
cd "$(dirname "$0")/.."
for shift in cross_site cross_task; do
    python evaluate_external.py --checkpoint ./playground/SAM --model_type vit_b \
        --model_weight ${MODEL_WEIGHT:-./playground/MedSegX/medsegx_vit_b.pth} \
        --data_path ${DATA_PATH:-./playground/MedSegDB/eval/RealWorld} --shift_type $shift --metric dsc hd \
        --device_ids ${DEVICE_IDS:-0} --batch_size 32 "$@"
done
