#!/usr/bin/env bash
# Does ConMoAE help, and not hurt, on real data it was not trained on? LiteMedSAM + ConMoAE pre-trained on the
# real mini-MedSegDB's train/ with several recipes and seeds, each scored zero-shot on the ID test set and on
# held-out sets it never saw, beside zero-shot LiteMedSAM:
#   bash scripts/reproduce-generalisation.sh [MedSegDB-real folder]   (default: ../shared/data/MedSegDB-real)
# Held-out: CT organs of ../shared/data/volumes (8 abdominal organs, none in train/; every 4th slice), HC18
# fetal head (cross-task) and HAM10000 skin lesions (cross-site): their inference/ slices are the test;
# HC18's finetune/ slices are the held-out validation set of the early-stopping recipe (never a test set).
# Environment: RECIPES (default "jitter5 lrsplit paper lowlr frozen"; also "earlystop", "multimask", "l2sp",
# "l2sp-strong", "jitter5-l2sp", "ctxdec", "ctxdec-only", "taskdec", "taskdec-lr2", "taskdec-blocks"), SEEDS (default "0 1 2"), EPOCHS (default 12),
# THREADS, OUT (default playground/generalisation), PREFIX_CACHE (default $OUT/prefix-cache: the frozen
# prefix of each slice, computed once for the whole study). Writes $OUT/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_help.sh
bash scripts/setup-env.sh
PY=${MEDSEGX_VENV:-.venv}/bin/python
DB=${1:-../shared/data/MedSegDB-real}
VOLUMES=${VOLUMES:-$(dirname "$DB")/volumes}
OUT=${OUT:-playground/generalisation}
THREADS=${THREADS:-$(nproc 2>/dev/null || echo 2)}
EPOCHS=${EPOCHS:-12}
export OMP_NUM_THREADS=$THREADS
# the frozen prefix of every slice is computed once for the whole study (every recipe, seed, epoch, evaluation)
CACHE=${PREFIX_CACHE:-$OUT/prefix-cache}
COMMON=(--model_type lite --device_ids --num_workers 0 --threads "$THREADS" --prefix_cache_dir "$CACHE")
start=$(date +%s)

# 1. the held-out CT organs, converted like any user's data (the data tree is only read)
if [ ! -d "$OUT/heldout/CTorgans" ]; then
    mkdir -p "$OUT/heldout/src/img" "$OUT/heldout/src/lab"
    ln -sf "$(cd "$VOLUMES" && pwd)/ct_abdomen_small.nii.gz" "$OUT/heldout/src/img/ct.nii.gz"
    ln -sf "$(cd "$VOLUMES" && pwd)/ct_abdomen_small_label.nii.gz" "$OUT/heldout/src/lab/ct.nii.gz"
    $PY prepare_data.py --images "$OUT/heldout/src/img" --labels "$OUT/heldout/src/lab" --modality CT \
        --labels_map "1:Spleen,2:RightKidney,3:LeftKidney,4:Gallbladder,6:Stomach,7:Pancreas,52:Aorta,63:Postcava" \
        --dataset TotalSegCT --out "$OUT/heldout/CTorgans" --min_pixels 40 --slice_step 4 --log_level WARNING
fi

score() {  # score <weights or ""> <output folder>: ID, the CT organs, HC18 and HAM10000
    local weight=() out=$2
    [ -n "$1" ] && weight=(--model_weight "$1")
    $PY evaluate_internal.py "${COMMON[@]}" "${weight[@]}" --data_path "$DB/eval/ID" --output_dir "$out/ID" --batch_size 8
    $PY evaluate_internal.py "${COMMON[@]}" "${weight[@]}" --data_path "$OUT/heldout/CTorgans" --output_dir "$out/CTorgans" \
        --batch_size 8
    for shift in cross_task cross_site; do
        $PY evaluate_external.py "${COMMON[@]}" "${weight[@]}" --data_path "$DB/eval/OOD" --shift_type $shift \
            --output_dir "$out/OOD" --batch_size 8
    done
}

# 2. zero-shot LiteMedSAM (adapters at zero: exactly LiteMedSAM's output)
[ -f "$OUT/zero-shot/ID/internal/ID.csv" ] || score "" "$OUT/zero-shot"

# 3. the recipes, each over the seeds. Training boxes grow by 0..20 px per side (the paper's jitter) in all
# but the jitter5 recipes, which use LiteMedSAM's own 0..5 px (the lite default since this study).
for recipe in ${RECIPES:-jitter5 lrsplit paper lowlr frozen}; do
    J20=(--box_jitter 20)
    case $recipe in
        paper) FLAGS=(--lr 1e-3 "${J20[@]}" --val_path none);;                      # adapters + decoder, last epoch
        frozen) FLAGS=(--lr 1e-3 --freeze_decoder "${J20[@]}" --val_path none);;    # adapters and context only
        lrsplit) FLAGS=(--lr 1e-3 --decoder_lr 1e-4 "${J20[@]}" --val_path none);;  # the decoder 10x slower
        lowlr) FLAGS=(--lr 1e-4 "${J20[@]}" --val_path none);;                      # adapters + decoder, 10x slower
        earlystop) FLAGS=(--lr 1e-3 --decoder_lr 1e-4 "${J20[@]}"  # lrsplit, the epoch chosen on a held-out task
                          --val_path "$DB/eval/OOD/cross_task/US_FetalHead/HC18/finetune");;
        multimask) FLAGS=(--lr 1e-3 "${J20[@]}" --val_path none --mask_outputs multimask);;  # before: tokens 1..3
        l2sp) FLAGS=(--lr 1e-3 --l2sp 100 "${J20[@]}" --val_path none);;            # decoder pulled to its start
        l2sp-strong) FLAGS=(--lr 1e-3 --l2sp 300 "${J20[@]}" --val_path none);;     # (drift ~1/l2sp per weight)
        jitter5) FLAGS=(--lr 1e-3 --decoder_lr 1e-4 --box_jitter 5 --val_path none);;  # lrsplit, LiteMedSAM's jitter
        jitter5-l2sp) FLAGS=(--lr 1e-3 --l2sp 300 --box_jitter 5 --val_path none);;    # l2sp-strong, LiteMedSAM's jitter
        # context-gated decoder adapters (model/decoder_adapters.py), the decoder itself frozen:
        ctxdec) FLAGS=(--lr 1e-3 --decoder_adapters --freeze_decoder --box_jitter 5 --val_path none);;
        ctxdec-only) FLAGS=(--lr 1e-3 --decoder_adapters --freeze_decoder --freeze_encoder_adapters  # and the
                            --box_jitter 5 --val_path none);;                                       # encoder's too
        # a decoder of its own for the trained tasks (model/decoder_adapters.py TaskDecoder), encoder fixed:
        taskdec) FLAGS=(--lr 1e-4 --task_decoder --freeze_decoder --freeze_encoder_adapters --box_jitter 5
                        --val_path none);;
        taskdec-lr2) FLAGS=(--lr 2e-4 --task_decoder --freeze_decoder --freeze_encoder_adapters --box_jitter 5
                            --val_path none);;                                  # taskdec, the decoder 2x faster
        # taskdec-lr2 with ConMoAE in TinyViT blocks 6-9 learning too (the lite default adapts 8-9)
        taskdec-blocks) FLAGS=(--lr 2e-4 --task_decoder --adapted_blocks 6 7 8 9 --box_jitter 5 --val_path none);;
        *) echo "unknown recipe $recipe" >&2; exit 2;;
    esac
    for seed in ${SEEDS:-0 1 2}; do
        run=$OUT/$recipe/seed$seed
        [ -f "$run/scores/OOD/external/OOD-site.csv" ] && continue
        $PY pretrain.py "${COMMON[@]}" "${FLAGS[@]}" --seed "$seed" --data_path "$DB/train" --num_epochs "$EPOCHS" \
            --batch_size 8 --work_dir "$OUT/$recipe" --task_name "seed$seed" --overwrite
        weight=$run/model_latest.pth
        [ "$recipe" = earlystop ] && weight=$run/model_best.pth
        score "$weight" "$run/scores"
    done
done

$PY scripts/generalisation_table.py "$OUT" | tee "$OUT/table.md"
echo "[generalisation] done in $(( $(date +%s) - start )) s"
