#!/usr/bin/env bash
# The replication of issues #9 and #20: the bases, then every variant x seed of each task, then (LONG=1) the
# 5x longer Sudoku runs (seeds LONG_SEEDS, default 0 1, one seed at a time) of the best diffu-GRPO learning
# rate (on held-out data) and the four EGSPO variants (runs/replication_long).
# One GPU (default): under CUDA MPS when the machine has it (scripts/start_mps.sh), the two bases in
# parallel, then all 21 runs of a task at once, Sudoku first. Measured on one H200 (2026-12-01): bases
# 58 / 123 s, Sudoku grid 512 s, Countdown grid 834 s, the long runs 562 s and 628 s per seed.
# Several GPUs (GPUS="0 1"): one worker per GPU takes jobs in order, bases first, then one replicate.py
# command per task and seed (a grid waits for its base).
# Writes runs/replication/ and runs/replication/DONE at the end (NOBASE if a base is out of range).
#   [GPUS="0 1"] [TASKS="sudoku countdown"] [VARIANTS="..."] [TARGET=lo,hi] \
#   [LONG=1 [GRIDS=0] [BEST_DIFFU=variant] [LONG_SEEDS="0 1"]] \
#       bash scripts/replication_gpu.sh REFERENCE_DIR [SEEDS...]
# GRIDS=0 (one GPU) builds the bases and runs only the longer runs; their diffu-GRPO variant is then
# BEST_DIFFU (default: the best on held-out data among runs/replication/sudoku's runs, which must exist).
# REFERENCE_DIR holds 4x4_test_sudoku.csv and countdown_cd3_test.jsonl. Bases already built are reused.
# Evaluation every 50 RL steps for Sudoku (200 steps), every 40 for Countdown (120 steps).
set -u
ref=${1:-}
[ $# -gt 0 ] && shift
seeds=${*:-0 1 2}
tasks=${TASKS:-sudoku countdown}
gpus=${GPUS:-}
declare -A reference_files=([sudoku]=4x4_test_sudoku.csv [countdown]=countdown_cd3_test.jsonl)
for task in $tasks; do
    [ -n "${reference_files[$task]:-}" ] || { echo "TASKS: unknown task '$task' (sudoku, countdown)" >&2; exit 2; }
    [ -f "$ref/${reference_files[$task]}" ] || {
        echo "no $ref/${reference_files[$task]}: give the directory that holds the reference test sets" \
             "(usage: bash scripts/replication_gpu.sh REFERENCE_DIR [SEEDS...])" >&2; exit 2; }
done
for seed in ${LONG_SEEDS:-0 1}; do
    [[ $seed =~ ^[0-9]+$ ]] || { echo "LONG_SEEDS: '$seed' is not a seed (give whole numbers, e.g. LONG_SEEDS=\"0 1\")" >&2; exit 2; }
done
ref=$(cd "$ref" && pwd)  # the script works from the repository root
# Held-out accuracy range (percent) that build_base picks the base from. Sudoku's generated puzzles
# are easier than the reference set (held-out 10.2% came with 6.4% on it), hence its higher floor.
declare -A default_target=([sudoku]=15,40 [countdown]=10,40)
# diffu-GRPO at three learning rates on both tasks (the report takes the best on held-out data).
declare -A default_variants=(
    [sudoku]="diffu_grpo diffu_grpo_lr1e-4 diffu_grpo_lr1e-3 egspo egspo_sa random uniform"
    [countdown]="diffu_grpo diffu_grpo_lr1e-4 diffu_grpo_lr1e-3 egspo egspo_sa random uniform")
declare -A every=([sudoku]=50 [countdown]=40)
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
out=runs/replication
claims=$out/.claims
mkdir -p $out
rm -rf $out/DONE $out/NOBASE $claims
mkdir -p $claims

reference_file() {  # task
    echo "${reference_files[$1]}"
}

build_base() {  # task
    local task=$1
    if [ ! -f $out/$task-base/chosen/config.json ]; then
        python scripts/build_base.py --config configs/replication/sft_$task.yaml --out $out/$task-base \
            --reference-test "$ref/$(reference_file $task)" --target "${TARGET:-${default_target[$task]}}" \
            > $out/$task-base.log 2>&1 \
            || { echo $task >> $out/NOBASE; echo failed > $claims/base-$task/state; return; }
    fi
    echo done > $claims/base-$task/state
}

grid() {  # task seeds... (all the seeds' runs at once)
    local task=$1
    shift
    local variants=(${VARIANTS:-${default_variants[$task]}}) tag
    tag=$(IFS=-; echo "$*")
    # shellcheck disable=SC2086
    python scripts/replicate.py --task $task --reference-test "$ref/$(reference_file $task)" --seeds "$@" \
        --variants "${variants[@]}" --parallel $(( ${#variants[@]} * $# )) --every ${every[$task]} \
        model_name_or_path=$out/$task-base/chosen > $out/$task-grid-s$tag.log 2>&1
}

long_runs() {  # the 5x longer Sudoku runs after the Sudoku grid: one seed's 5 runs at a time
    local best=${BEST_DIFFU:-} seed
    [ -n "$best" ] || best=$(python scripts/replication_report.py --best-diffu-grpo $out/sudoku) || return
    : > $out/long.log  # one log per invocation; each seed's command appends to it
    for seed in ${LONG_SEEDS:-0 1}; do
        python scripts/replicate.py --task sudoku --reference-test "$ref/$(reference_file sudoku)" --seeds $seed \
            --variants $best egspo egspo_sa random uniform --parallel 5 --every 100 --steps-factor 5 \
            --out runs/replication_long model_name_or_path=$out/sudoku-base/chosen >> $out/long.log 2>&1
    done
}

jobs=()
for task in $tasks; do jobs+=("base-$task"); done
for task in $tasks; do for seed in $seeds; do jobs+=("grid-$task-$seed"); done; done

worker() {  # gpu ('' = leave CUDA_VISIBLE_DEVICES alone)
    [ -n "$1" ] && export CUDA_VISIBLE_DEVICES=$1
    local job task seed state progress=1
    while [ $progress = 1 ]; do
        progress=0
        for job in "${jobs[@]}"; do
            [ -d $claims/$job ] && continue
            progress=1
            if [[ $job == grid-* ]]; then
                task=${job#grid-}; seed=${task##*-}; task=${task%-*}
                state=$(cat $claims/base-$task/state 2>/dev/null)
                [ "$state" = failed ] && { mkdir $claims/$job 2>/dev/null; echo "no $task base: see $out/$task-base.log" >&2; continue; }
                [ "$state" = done ] || continue  # base still being built: try a later job
                mkdir $claims/$job 2>/dev/null || continue
                grid $task $seed
            else
                mkdir $claims/$job 2>/dev/null || continue
                build_base ${job#base-}
            fi
            continue 2
        done
        [ $progress = 1 ] && sleep 5
    done
}

start=$(date +%s)
if [ -z "$gpus" ]; then
    . scripts/start_mps.sh
    # One GPU: the bases in parallel first (SFT sharing the CPUs with 18 RL runs slowed down 7x), then each
    # task's grid, all its seeds at once.
    for task in $tasks; do mkdir $claims/base-$task; build_base $task & done
    wait
    for task in $tasks; do
        # shellcheck disable=SC2086
        [ "${GRIDS:-1}" != 0 ] && [ "$(cat $claims/base-$task/state)" = done ] && grid $task $seeds
    done
else
    for gpu in $gpus; do worker $gpu & done
    wait
fi
[ "${LONG:-0}" = 1 ] && [ -f $out/sudoku-base/chosen/config.json ] && long_runs
echo "$(( $(date +%s) - start )) s" > $out/DONE
