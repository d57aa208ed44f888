#!/usr/bin/env bash
# Issue #18: EGSPO-SA on the exact rollout against the approximate dual-cached one (and, on Sudoku, the
# dual cache refreshed every 2 steps), same base, same seeds, same rollouts, on one GPU:
# - 4x4 Sudoku in 3 blocks (block_length 8, 12 denoising steps: 4 per block), 200 steps x 64 rollouts;
# - 3-number Countdown, the replication's settings (3 blocks of 16, 24 steps), 120 steps x 64 rollouts.
# The bases are the replication's (runs/replication/TASK-base, built here if missing). All runs at once.
#   [OUT=runs/cache_parity] [SEEDS="0 1 2"] bash scripts/cache_parity_gpu.sh REFERENCE_DIR
#   python scripts/replication_report.py --runs runs/cache_parity --data docs/data/cache_parity --prefix cache_parity
# Writes OUT/DONE (seconds) at the end.
set -u
ref=${1:?reference data directory (4x4_test_sudoku.csv, countdown_cd3_test.jsonl)}
cd "$(dirname "$0")/.."
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
out=${OUT:-runs/cache_parity}
seeds=${SEEDS:-0 1 2}
bases=runs/replication
mkdir -p "$out" $bases
rm -f "$out/DONE"
start=$(date +%s)
declare -A target=([sudoku]=15,40 [countdown]=10,40) reference=([sudoku]=4x4_test_sudoku.csv [countdown]=countdown_cd3_test.jsonl)
for task in sudoku countdown; do
    [ -f $bases/$task-base/chosen/config.json ] || python scripts/build_base.py \
        --config configs/replication/sft_$task.yaml --out $bases/$task-base --reference-test "$ref/${reference[$task]}" \
        --target "${target[$task]}" > $bases/$task-base.log 2>&1 &
done
wait
# shellcheck disable=SC2086
python scripts/replicate.py --task sudoku --reference-test "$ref/4x4_test_sudoku.csv" --seeds $seeds \
    --variants egspo_sa egspo_sa_dual egspo_sa_dual_refresh2 --parallel 9 --every 25 --out "$out" \
    model_name_or_path=$bases/sudoku-base/chosen block_length=8 > "$out/sudoku.log" 2>&1 &
# shellcheck disable=SC2086
python scripts/replicate.py --task countdown --reference-test "$ref/countdown_cd3_test.jsonl" --seeds $seeds \
    --variants egspo_sa egspo_sa_dual --parallel 6 --every 20 --out "$out" \
    model_name_or_path=$bases/countdown-base/chosen > "$out/countdown.log" 2>&1 &
wait
echo "$(( $(date +%s) - start )) s" > "$out/DONE"
