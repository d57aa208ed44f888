#!/usr/bin/env bash
# The whole issue-#9 replication on one GPU: both bases (in parallel), then both grids (all runs share
# the GPU). Bases first: SFT that shares the CPUs with 18 RL runs slowed down 7x when tried.
# Writes runs/replication/ and runs/replication/DONE at the end.
#   bash scripts/replication_gpu.sh REFERENCE_DIR [SEEDS...]
# REFERENCE_DIR holds 4x4_test_sudoku.csv and countdown_cd3_test.jsonl. Bases already built are reused.
set -u
ref=${1:?reference data directory}
shift
seeds=${*:-0 1 2}
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
out=runs/replication
mkdir -p $out
rm -f $out/DONE

build_base() {  # task reference-file
    local task=$1 file=$2
    [ -f $out/$task-base/chosen/config.json ] && return 0
    python scripts/build_base.py --config configs/replication/sft_$task.yaml --out $out/$task-base \
        --reference-test "$ref/$file" --target 10,40 > $out/$task-base.log 2>&1
}

grid() {  # task reference-file
    local task=$1 file=$2
    [ -f $out/$task-base/chosen/config.json ] || { echo "no $task base: see $out/$task-base.log" >&2; return 1; }
    python scripts/replicate.py --task $task --reference-test "$ref/$file" --seeds $seeds --out $out \
        --variants diffu_grpo diffu_grpo_low_lr egspo egspo_sa random uniform --parallel 18 \
        model.name_or_path=$out/$task-base/chosen > $out/$task-grid.log 2>&1
}

start=$(date +%s)
build_base sudoku 4x4_test_sudoku.csv &
build_base countdown countdown_cd3_test.jsonl &
wait
grid sudoku 4x4_test_sudoku.csv &
grid countdown countdown_cd3_test.jsonl &
wait
echo "$(( $(date +%s) - start )) s" > $out/DONE
