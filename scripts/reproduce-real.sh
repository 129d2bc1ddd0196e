#!/usr/bin/env bash
# One seed of the README's recommended recipe, end to end: MedSegX on LiteMedSAM, on the real mini-MedSegDB, on
# the CPU, then fine-tuning on a new task (the README's "Fine-tuning a new site").
#   bash scripts/reproduce-real.sh [MedSegDB-real folder]   (default: ../shared/data/MedSegDB-real)
# 1. zero-shot LiteMedSAM (adapters at zero) on eval/ID and on the OOD cross-task site (HC18 fetal head);
# 2. pre-training on train/ (a few minutes on 2 cores) with the "taskdec-lr2" recipe of
#    scripts/reproduce-generalisation.sh, the README's: the image encoder fixed (--freeze_encoder_adapters),
#    the lite default's task decoder learns the training set's tasks at lr 2e-4 (LR) while every other task
#    keeps LiteMedSAM's decoder exactly; training boxes grown by LiteMedSAM's own 0..5 px (the lite default);
#    a fixed number of epochs and no validation, so eval/ID never picks the checkpoint (the last epoch's
#    weights are scored);
# 3. the trained model on eval/ID; 4. fine-tuning on HC18 with 50% and 100% of its fine-tune cases
#    (checkpoint picked on 20% of HC18's finetune/ cases, scored on its inference/ slices).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_help.sh
bash scripts/setup-env.sh
PY=${MEDSEGX_VENV:-.venv}/bin/python
DB=${1:-../shared/data/MedSegDB-real}
OUT=${REAL_OUT:-playground/real}
THREADS=${THREADS:-$(nproc 2>/dev/null || echo 2)}
export OMP_NUM_THREADS=$THREADS
COMMON=(--model_type lite --device_ids --num_workers 0 --threads "$THREADS" --seed 0)
start=$(date +%s)

rm -rf $OUT/zero-shot $OUT/pretrain $OUT/finetune
$PY evaluate_internal.py "${COMMON[@]}" --data_path $DB/eval/ID --output_dir $OUT/zero-shot --batch_size 8
$PY evaluate_external.py "${COMMON[@]}" --data_path $DB/eval/OOD --shift_type cross_task --output_dir $OUT/zero-shot \
    --batch_size 8
train_start=$(date +%s)
$PY pretrain.py "${COMMON[@]}" --data_path $DB/train --val_path none --num_epochs ${EPOCHS:-12} \
    --batch_size 8 --lr ${LR:-2e-4} --freeze_encoder_adapters --prefix_cache --work_dir $OUT --task_name pretrain
echo "[reproduce] pre-training: $(( $(date +%s) - train_start )) s"
$PY evaluate_internal.py "${COMMON[@]}" --model_weight $OUT/pretrain/model_latest.pth --data_path $DB/eval/ID \
    --batch_size 8
$PY evaluate_external.py "${COMMON[@]}" --model_weight $OUT/pretrain/model_latest.pth --data_path $DB/eval/OOD \
    --shift_type cross_task --batch_size 8
echo "[reproduce] pre-training and evaluation: $(( $(date +%s) - train_start )) s"
$PY finetune.py "${COMMON[@]}" --data_path $DB/eval/OOD --shift_type cross_task --validation val \
    --resume $OUT/pretrain/model_latest.pth --data_ratio 0.5 1.0 --num_epochs ${FT_EPOCHS:-8} --batch_size 4 \
    --lr 1e-4 --prefix_cache --work_dir $OUT --task_name finetune

$PY -m medsegx compare $OUT/zero-shot/internal/ID.csv $OUT/pretrain/internal/ID.csv \
    --labels "zero-shot LiteMedSAM" "MedSegX pre-trained" --title "eval/ID, the lite default label-free selection" --out $OUT/id_table.md
$PY -m medsegx compare $OUT/zero-shot/external/OOD-task.csv $OUT/pretrain/external/OOD-task.csv --external \
    --labels "zero-shot LiteMedSAM" "MedSegX pre-trained" --title "eval/OOD cross_task (inference/), the lite default label-free selection" \
    --out $OUT/ood_table.md
cat $OUT/id_table.md $OUT/ood_table.md $OUT/finetune/cross_task/summary.md
echo "[reproduce] total $(( $(date +%s) - start )) s"
