#!/usr/bin/env bash
# The whole issue-#9 replication on one GPU: both bases, then both grids (each grid starts as soon as
# its base exists; runs share the GPU). Writes runs/replication/ and runs/replication/DONE at the end.
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

task_pipeline() {  # task reference-file
    local task=$1 file=$2
    if [ ! -f $out/$task-base/chosen/config.json ]; then
        python scripts/build_base.py --config configs/replication/sft_$task.yaml --out $out/$task-base \
            --reference-test "$ref/$file" --target 10,40 > $out/$task-base.log 2>&1 || return 1
    fi
    python scripts/replicate.py --task $task --reference-test "$ref/$file" --seeds $seeds --out $out \
        --variants diffu_grpo diffu_grpo_low_lr egspo egspo_sa random uniform --parallel 18 \
        model.name_or_path=$out/$task-base/chosen > $out/$task-grid.log 2>&1
}

start=$(date +%s)
task_pipeline sudoku 4x4_test_sudoku.csv &
task_pipeline countdown countdown_cd3_test.jsonl &
wait
echo "$(( $(date +%s) - start )) s" > $out/DONE
