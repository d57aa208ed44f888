#!/usr/bin/env bash
# The paper-settings EGSPO-SA step at LLaDA-8B's shape on 1 and 2 GPUs (issue #21), through the whole
# trainer: builtin:llada-8b-blocks (random weights, LLaDA-8B's 32 blocks of width 4096 = 7.5B parameters, the
# character vocabulary), configs/llada/sudoku_egspo_sa.yaml (LoRA r 128, completion 256, block 32, T 128,
# K 8, G 8), 3 steps of the same global batch of 8 rollouts: 8 per GPU on 1 GPU, 4 per GPU on 2 (DDP).
#   OUT=runs/scaling8b bash scripts/scaling_8b_gpu.sh      (then: python scripts/scaling_report.py --8b OUT)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8 TOKENIZERS_PARALLELISM=false
out=${OUT:-runs/scaling8b}
mkdir -p "$out"
run=(--config configs/llada/sudoku_egspo_sa.yaml model_name_or_path=builtin:llada-8b-blocks max_steps=3 save_steps=0
     num_train=64 lora_dropout=0.0)

record() { echo "{\"run\": \"$1\", \"rc\": $2, \"seconds\": $3}" >> "$out/runs.jsonl"; echo "$(date +%T) $1 rc=$2 ${3}s"; }

start=$SECONDS
CUDA_VISIBLE_DEVICES=0 timeout 280 ${PYTHON:-python3} -m egspo.cli train "${run[@]}" per_device_train_batch_size=8 \
    output_dir="$out/ddp_lora_1gpu" > "$out/ddp_lora_1gpu.log" 2>&1
record ddp_lora_1gpu $? $((SECONDS - start))
start=$SECONDS
timeout 280 ${PYTHON:-python3} -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes 2 \
    -m egspo.cli train "${run[@]}" per_device_train_batch_size=4 output_dir="$out/ddp_lora_2gpu" \
    > "$out/ddp_lora_2gpu.log" 2>&1
record ddp_lora_2gpu $? $((SECONDS - start))
