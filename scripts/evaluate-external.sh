#!/usr/bin/env bash
# The paper's external evaluation on eval/<SPLIT> (OOD or RealWorld), cross-site then cross-task:
#   bash scripts/evaluate-external.sh OOD|RealWorld [extra evaluate_external.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
HELP_PYTHON=evaluate_external.py source scripts/_help.sh
source scripts/_python.sh
split=${1:?usage: evaluate-external.sh OOD|RealWorld [flags]}
shift
for shift_type in cross_site cross_task; do
    "$MEDSEGX_PYTHON" evaluate_external.py --checkpoint ./playground/SAM --model_type vit_b \
        --model_weight ${MODEL_WEIGHT:-./playground/MedSegX/medsegx_vit_b.pth} \
        --data_path ${DATA_PATH:-./playground/MedSegDB/eval/$split} --shift_type $shift_type --metric dsc hd \
        --device_ids ${DEVICE_IDS:-0} --batch_size 32 "$@"
done
