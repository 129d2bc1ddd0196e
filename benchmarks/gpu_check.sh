#!/usr/bin/env bash
# MedSegX GPU check: ONE prepared run for a machine with one NVIDIA GPU (< 8 min on an H100).
#
#   bash benchmarks/gpu_check.sh                 # results in $OUT/gpu_results.md (OUT defaults to ./gpu_out)
#   OUT=/tmp/g bash benchmarks/gpu_check.sh --parts eval step     # a subset
#   bash benchmarks/gpu_check.sh --cpu-smoke     # tiny sizes on the CPU: checks the script, measures nothing
#
# Self-contained: generates a phantom MedSegDB and a random SAM ViT-B file (Meta's layout) under
# $OUT/work, then (benchmarks/gpu_bench.py):
#   1. ViT-B@256 evaluation forward img/s, inference_mode, batch 256: stock fp32 (baseline), fast fp32,
#      stock bf16, fast bf16 autocast; peak torch.cuda.max_memory_allocated
#   2. training step samples/s on a GPU-resident batch of 128 (train_one_epoch, fp16 + GradScaler;
#      stock vs fast; fast bf16)
#   3. 50 training steps from the phantom loader, fast path, --use_amp fp16 + GradScaler, peak memory
#   4. evaluate_internal.py (--no_fast fp32 vs fast --use_amp bf16) and pretrain.py --max_steps 50
#      --use_amp, each as a subprocess, wall clock
# Needs: a python with the project's requirements and a CUDA build of torch ($PYTHON, else
# ./.venv/bin/python when present, else python3). Prints the GPU name; every part's figures are
# written to $OUT/gpu_results.md as soon as they exist, so a time-out keeps what was done.
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LIMIT="${GPU_CHECK_LIMIT:-460}"   # seconds for the whole python part (the budget is 8 min)

{
    echo "# gpu_check.sh $(date '+%Y-%m-%d %H:%M:%S %Z'), python: $PYTHON, OUT: $OUT"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    else
        echo "# nvidia-smi not found"
    fi
    "$PYTHON" - <<'EOF' || echo "# torch import failed: install the project's requirements (with a CUDA torch)"
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("GPU name:", torch.cuda.get_device_name(0))
EOF
} 2>&1 | tee "$OUT/gpu_check.log"

export OUT PYTHONUNBUFFERED=1
timeout --kill-after=15 "$LIMIT" "$PYTHON" benchmarks/gpu_bench.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "# gpu_bench.py stopped at the ${LIMIT}s limit; $OUT/gpu_results.md holds the parts that finished" \
        | tee -a "$OUT/gpu_check.log"
fi
rm -rf "$OUT/work"   # phantom data and the random SAM file (~400 MB): regenerated on the next run
echo "# exit $rc; results: $OUT/gpu_results.md, log: $OUT/gpu_check.log"
exit "$rc"
