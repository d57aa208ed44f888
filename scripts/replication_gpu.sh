#!/usr/bin/env bash
# The issue-#9 replication on one GPU: the bases (in parallel), then the grids (all runs share the
# GPU). Bases first: SFT that shares the CPUs with 18 RL runs slowed down 7x when tried.
# Writes runs/replication/ and runs/replication/DONE at the end (NOBASE if a base is out of range).
#   [TASKS="sudoku countdown"] [VARIANTS="..."] [TARGET=10,40] bash scripts/replication_gpu.sh REFERENCE_DIR [SEEDS...]
# REFERENCE_DIR holds 4x4_test_sudoku.csv and countdown_cd3_test.jsonl. Bases already built are reused.
# Evaluation every 25 RL steps for Sudoku (200 steps), every 20 for Countdown (120 steps).
set -u
ref=${1:?reference data directory}
shift
seeds=${*:-0 1 2}
tasks=${TASKS:-sudoku countdown}
variants=${VARIANTS:-diffu_grpo diffu_grpo_low_lr egspo egspo_sa random uniform}
target=${TARGET:-10,40}  # held-out accuracy range (percent) that build_base picks the base from
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
out=runs/replication
mkdir -p $out
rm -f $out/DONE $out/NOBASE

reference_file() {  # task
    case $1 in sudoku) echo 4x4_test_sudoku.csv ;; countdown) echo countdown_cd3_test.jsonl ;; esac
}

build_base() {  # task
    local task=$1
    [ -f $out/$task-base/chosen/config.json ] && return 0
    python scripts/build_base.py --config configs/replication/sft_$task.yaml --out $out/$task-base \
        --reference-test "$ref/$(reference_file $task)" --target $target > $out/$task-base.log 2>&1 \
        || echo $task >> $out/NOBASE
}

grid() {  # task
    local task=$1 every=25
    [ $task = countdown ] && every=20
    [ -f $out/$task-base/chosen/config.json ] || { echo "no $task base: see $out/$task-base.log" >&2; return 1; }
    # shellcheck disable=SC2086
    python scripts/replicate.py --task $task --reference-test "$ref/$(reference_file $task)" --seeds $seeds \
        --variants $variants --parallel 18 --every $every \
        model.name_or_path=$out/$task-base/chosen > $out/$task-grid.log 2>&1
}

start=$(date +%s)
for task in $tasks; do build_base $task & done
wait
for task in $tasks; do grid $task & done
wait
echo "$(( $(date +%s) - start )) s" > $out/DONE
