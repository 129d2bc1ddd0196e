#!/usr/bin/env bash
# Pre-training over several machines with torchrun. Run on every node with the same MASTER_ADDR:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash scripts/pretrain-multinode.sh
set -euo pipefail
cd "$(dirname "$0")/.."
HELP_PYTHON=pretrain.py source scripts/_help.sh
source scripts/_python.sh
"$MEDSEGX_PYTHON" -m torch.distributed.run --nnodes "${NNODES:-2}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
    pretrain.py --checkpoint ./playground/SAM --model_type vit_b --data_path ./playground/MedSegDB \
    --num_epochs 30 --batch_size ${BATCH_SIZE:-1024} --lr ${LR:-1e-3} --use_amp "$@"
