#!/usr/bin/env bash
# Which output should a box get when there is no label? Zero-shot LiteMedSAM (adapters at zero) with all four
# mask tokens as candidates (--mask_outputs all), scored on every held-out set of ../shared/data: each fixed
# token, the oracle (best by the label) and every label-free rule of medsegx/metrics/select.py, all from one
# evaluation per set (its *_outputs.csv):
#   bash scripts/reproduce-selection.sh [data folder]   (default: ../shared/data)
# Sets: MedSegDB-real eval/ID (the trained tasks, the in-distribution reference); 23 labelled structures of the
# shared CT volume (every one with a taxonomy task or a plain name, the liver left out: it is trained; slices
# with >= 40 pixels on the 256 grid, every 2nd), converted by prepare_data.py, and the volume's liver as a set of
# its own (a task the lite recipes train on, new to zero-shot LiteMedSAM); HC18 (cross-task) and HAM10000
# (cross-site) inference/ slices; the MedSegDB-example eval/ID, OOD and RealWorld sets (no lite recipe trains on
# them). Environment: THREADS (default 1), OUT (default playground/selection), SELECT (the rule the
# published-format files score; default the lite default). Writes $OUT/table.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_help.sh
bash scripts/setup-env.sh
PY=${MEDSEGX_VENV:-.venv}/bin/python
DATA=${1:-../shared/data}
OUT=${OUT:-playground/selection}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS
SEL=()
[ -n "${SELECT:-}" ] && SEL=(--select "$SELECT")
COMMON=(--model_type lite --mask_outputs all "${SEL[@]}" --device_ids --num_workers 0 --threads "$THREADS"
        --batch_size 4 --metric dsc hd --gallery 0)
start=$(date +%s)

ORGANS="1:Spleen,2:RightKidney,3:LeftKidney,4:Gallbladder,6:Stomach,7:Pancreas,8:RightAdrenalGland"
ORGANS+=",9:LeftAdrenalGland,10+11:LeftLung,13+14:RightLung,18:Intestine,19:Duodenum,20:Colon,30+31:LumbarSpine"
ORGANS+=",32+33:ThoracicSpine,52:Aorta,63:Postcava,64:PortalVein,79:SpinalCord,86:LeftAutochthon"
ORGANS+=",87:RightAutochthon,88:LeftIliopsoas,89:RightIliopsoas"
if [ ! -d "$OUT/heldout/CTorgans" ]; then
    mkdir -p "$OUT/heldout/src/img" "$OUT/heldout/src/lab"
    ln -sf "$(cd "$DATA/volumes" && pwd)/ct_abdomen_small.nii.gz" "$OUT/heldout/src/img/ct.nii.gz"
    ln -sf "$(cd "$DATA/volumes" && pwd)/ct_abdomen_small_label.nii.gz" "$OUT/heldout/src/lab/ct.nii.gz"
    $PY prepare_data.py --images "$OUT/heldout/src/img" --labels "$OUT/heldout/src/lab" --modality CT \
        --labels_map "$ORGANS" --dataset TotalSegCT --out "$OUT/heldout/CTorgans" --min_pixels 40 --slice_step 2 \
        --log_level ERROR
fi
if [ ! -d "$OUT/heldout/CTliver" ]; then
    $PY prepare_data.py --images "$OUT/heldout/src/img" --labels "$OUT/heldout/src/lab" --modality CT \
        --labels_map 5:Liver --dataset TotalSegCT --out "$OUT/heldout/CTliver" --min_pixels 40 --slice_step 2 \
        --log_level ERROR
fi

internal() {  # internal <data> <set folder>
    [ -f "$OUT/$2/internal/ID_outputs.csv" ] || \
        $PY evaluate_internal.py "${COMMON[@]}" --data_path "$1" --output_dir "$OUT/$2"
}
external() {  # external <data> <shift> <set folder>
    ls "$OUT/$3"/external/*_outputs.csv >/dev/null 2>&1 || \
        $PY evaluate_external.py "${COMMON[@]}" --data_path "$1" --shift_type "$2" --output_dir "$OUT/$3"
}
REAL=$DATA/MedSegDB-real/eval
EXAMPLE=$DATA/MedSegDB-example/eval
internal "$REAL/ID" ID
internal "$OUT/heldout/CTorgans" CTorgans
internal "$OUT/heldout/CTliver" CTliver
external "$REAL/OOD" cross_task HC18
external "$REAL/OOD" cross_site HAM10000
internal "$EXAMPLE/ID" example-ID
for split in OOD RealWorld; do
    external "$EXAMPLE/$split" cross_site "example-$split-site"
    external "$EXAMPLE/$split" cross_task "example-$split-task"
done

$PY scripts/selection_table.py "$OUT" | tee "$OUT/table.md"
echo "[selection] done in $(( $(date +%s) - start )) s"
