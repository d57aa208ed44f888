#!/usr/bin/env bash
# Multi-GPU evidence (issue #21) on one host with 2 GPUs, in one command of about 8 minutes:
#  1. timing: the 27M Sudoku replication shape (rl_sudoku.yaml: 64 rollouts per step, 24 tokens, T 12, K 4)
#     from random builtin:small weights, 20 steps, on 1 GPU and on 2 GPUs with the same global batch
#     (64 = 64 x 1 = 32 x 2): DDP with LoRA and with full fine-tuning, FSDP2 with LoRA and full;
#  2. learning curves: the demo's EGSPO-SA run (builtin:sudoku-tiny, 50 steps, eval every 10) on 1 and 2
#     GPUs, same seed and global batch;
#  3. kill and resume: the 2-GPU curve run again with a checkpoint every 10 steps; one training process is
#     killed (SIGKILL) after checkpoint-30, the run is resumed with --resume and must end with the
#     metrics of the uninterrupted 2-GPU run.
# Every run's metrics.jsonl and log land in OUT (default runs/scaling); runs.jsonl has one line per run.
#   OUT=runs/scaling bash scripts/scaling_gpu.sh
# Then: python scripts/scaling_report.py runs/scaling
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 TOKENIZERS_PARALLELISM=false
out=${OUT:-runs/scaling}
launch="timeout 150 ${PYTHON:-python3} -m accelerate.commands.launch"
mkdir -p "$out"
timing=(configs/replication/rl_sudoku.yaml model_name_or_path=builtin:small max_steps=20 save_steps=0)
curve=(output_dir=unused max_steps=50 eval_strategy=steps eval_steps=10 num_eval=200 save_steps=0)

record() {  # name rc seconds
    echo "{\"run\": \"$1\", \"rc\": $2, \"seconds\": $3}" >> "$out/runs.jsonl"
    echo "$(date +%T) $1 rc=$2 ${3}s"
}

one_gpu() {  # name gpu config args...
    local name=$1 gpu=$2 start=$SECONDS
    shift 2
    CUDA_VISIBLE_DEVICES=$gpu timeout 150 ${PYTHON:-python3} -m egspo.cli train --config "$@" output_dir="$out/$name" > "$out/$name.log" 2>&1
    record "$name" $? $((SECONDS - start))
}

two_gpus() {  # name accelerate-config config args...
    local name=$1 acc=$2 start=$SECONDS
    shift 2
    $launch --config_file "$acc" --num_processes 2 -m egspo.cli train --config "$@" \
        output_dir="$out/$name" > "$out/$name.log" 2>&1
    record "$name" $? $((SECONDS - start))
}

demo_config() {  # the packaged demo config's path
    ${PYTHON:-python3} -c "import importlib.resources as r; print(r.files('egspo') / 'configs' / 'demo_sudoku.yaml')"
}

nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpus.csv"
# 1. timing: the two 1-GPU runs side by side on separate GPUs, then the 2-GPU runs one at a time
one_gpu ddp_lora_1gpu 0 "${timing[@]}" per_device_train_batch_size=64 use_peft=true &
one_gpu ddp_full_1gpu 1 "${timing[@]}" per_device_train_batch_size=64 use_peft=false &
wait
two_gpus ddp_lora_2gpu configs/accelerate/ddp.yaml "${timing[@]}" per_device_train_batch_size=32 use_peft=true
two_gpus ddp_full_2gpu configs/accelerate/ddp.yaml "${timing[@]}" per_device_train_batch_size=32 use_peft=false
two_gpus fsdp_lora_2gpu configs/accelerate/fsdp.yaml "${timing[@]}" per_device_train_batch_size=32 use_peft=true
two_gpus fsdp_full_2gpu configs/accelerate/fsdp.yaml "${timing[@]}" per_device_train_batch_size=32 use_peft=false

# 2. learning curves (the demo config: 64 rollouts per step)
demo=$(demo_config)
one_gpu curve_1gpu 0 "$demo" "${curve[@]}" per_device_train_batch_size=64
two_gpus curve_2gpu configs/accelerate/ddp.yaml "$demo" "${curve[@]}" per_device_train_batch_size=32

# 3. kill one process after checkpoint-30, then resume
name=killed_2gpu
start=$SECONDS
$launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m egspo.cli train --config "$demo" \
    "${curve[@]}" per_device_train_batch_size=32 save_steps=10 output_dir="$out/$name" > "$out/$name.log" 2>&1 &
launcher=$!
until [ -d "$out/$name/checkpoint-30" ] || ! kill -0 $launcher 2>/dev/null; do sleep 0.5; done
sleep 2
# the launcher's last python descendant (a rank-1 worker): timeout -> launcher -> workers
victim=$(pgrep -f "output_dir=$out/$name" | tail -1)
echo "killing process $victim (of launcher $launcher) after $(ls -d "$out/$name"/checkpoint-* | xargs -n1 basename | tr '\n' ' ')"
kill -9 "$victim"
wait $launcher
record "$name" $? $((SECONDS - start))
start=$SECONDS
$launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m egspo.cli train --config "$demo" \
    "${curve[@]}" per_device_train_batch_size=32 save_steps=10 output_dir="$out/$name" --resume \
    > "$out/${name}_resume.log" 2>&1
record "${name}_resume" $? $((SECONDS - start))
echo done > "$out/DONE"
