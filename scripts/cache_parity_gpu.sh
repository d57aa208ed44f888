#!/usr/bin/env bash
# Issue #18: EGSPO-SA on the exact rollout against the approximate dual-cached one (and, on Sudoku, the
# dual cache refreshed every 2 steps), same base, same seeds, same rollouts, all runs at once on one GPU
# (under CUDA MPS where the machine has it: many small processes then share the GPU instead of time-slicing):
# - 4x4 Sudoku in 3 blocks (block_length 8, 12 denoising steps: 4 per block), 200 steps x 64 rollouts;
# - 3-number Countdown, the replication's settings (3 blocks of 16, 24 steps), 120 steps x 64 rollouts.
# The bases are the replication's (runs/replication/TASK-base, built here if missing).
#   [RUNS=runs/cache_parity] [SEEDS="0 1 2"] [DEADLINE=seconds] bash scripts/cache_parity_gpu.sh REFERENCE_DIR
#   python scripts/replication_report.py --runs runs/cache_parity --data docs/data/cache_parity --prefix cache_parity
# DEADLINE (from the script's start) stops runs still going, which keep their curves so far. Writes RUNS/DONE.
set -u
ref=${1:?reference data directory (4x4_test_sudoku.csv, countdown_cd3_test.jsonl)}
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
runs=${RUNS:-runs/cache_parity}
seeds=${SEEDS:-0 1 2}
bases=runs/replication
mkdir -p "$runs" $bases
rm -f "$runs/DONE"
start=$(date +%s)
declare -A target=([sudoku]=15,40 [countdown]=10,40) reference=([sudoku]=4x4_test_sudoku.csv [countdown]=countdown_cd3_test.jsonl)
for task in sudoku countdown; do
    [ -f $bases/$task-base/chosen/config.json ] || python scripts/build_base.py \
        --config configs/replication/sft_$task.yaml --out $bases/$task-base --reference-test "$ref/${reference[$task]}" \
        --target "${target[$task]}" > $bases/$task-base.log 2>&1 &
done
wait
deadline=()
[ -n "${DEADLINE:-}" ] && deadline=(--deadline $(( DEADLINE - ($(date +%s) - start) )))
# shellcheck disable=SC2086
python scripts/replicate.py --task sudoku --reference-test "$ref/4x4_test_sudoku.csv" --seeds $seeds \
    --variants egspo_sa egspo_sa_dual egspo_sa_dual_refresh2 --parallel 9 --every ${EVERY_SUDOKU:-50} --out "$runs" \
    "${deadline[@]}" model_name_or_path=$bases/sudoku-base/chosen block_length=8 > "$runs/sudoku.log" 2>&1 &
# shellcheck disable=SC2086
python scripts/replicate.py --task countdown --reference-test "$ref/countdown_cd3_test.jsonl" --seeds $seeds \
    --variants egspo_sa egspo_sa_dual --parallel 6 --every ${EVERY_COUNTDOWN:-40} --out "$runs" \
    "${deadline[@]}" model_name_or_path=$bases/countdown-base/chosen > "$runs/countdown.log" 2>&1 &
wait
echo "$(( $(date +%s) - start )) s" > "$runs/DONE"
