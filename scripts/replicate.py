"""Run the issue-#9 grid: every algorithm variant x seed from one base, several runs at once on one GPU.

    PYTHONPATH=src python scripts/replicate.py --task sudoku --reference-test 4x4_test_sudoku.csv \
        --seeds 0 1 2 [--variants diffu_grpo diffu_grpo_lr1e-4 diffu_grpo_lr1e-3 egspo egspo_sa random uniform] \
        [--parallel 15] \
        [--out runs/replication] [--deadline 540] [overrides ...]

Each run is ``scripts/rl_curve.py --config configs/replication/rl_TASK.yaml`` with the variant's
overrides and ``seed=SEED`` (the seed also changes the order of the training problems and the
rollouts' noise; the base model is the same). Runs go to OUT/TASK/VARIANT-sSEED (curve.json,
metrics.jsonl, config.yaml, log.txt); OUT/TASK/runs.json records each run's command, exit code and
wall time (merged with the records of earlier commands, so one command per seed builds one file), and
OUT/TASK/commands.jsonl gets one line per command with its seeds, variants and total seconds.
Runs that share a GPU slow each other down: the wall times say how many ran at once.
``--deadline`` stops runs still going after that many seconds (their curves keep what was done).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("replicate")
ROOT = Path(__file__).resolve().parent.parent
#: The algorithm variants of the table and the overrides that make each from configs/replication/rl_*.yaml.
#: diffu-GRPO at three learning rates (the report picks the best on held-out data); on d1's schedule one of its
#: steps generates gradient_accumulation_steps rollout batches, so equal_rollouts() shortens its runs.
VARIANTS: dict[str, list[str]] = {
    "diffu_grpo": ["algorithm=diffu_grpo"],
    "diffu_grpo_lr1e-4": ["algorithm=diffu_grpo", "learning_rate=1e-4"],
    "diffu_grpo_lr1e-3": ["algorithm=diffu_grpo", "learning_rate=1e-3"],
    "egspo": ["algorithm=egspo"],
    "egspo_sa": ["algorithm=egspo_sa"],
    "random": ["algorithm=egspo_sa", "step_selection=random"],
    "uniform": ["algorithm=egspo_sa", "step_selection=uniform"],
    # issue #18: EGSPO-SA on the approximate (dual KV-cached) rollout, against egspo_sa (exact) from the same base
    "egspo_sa_dual": ["algorithm=egspo_sa", "rollout_cache=dual"],
    "egspo_sa_dual_refresh2": ["algorithm=egspo_sa", "rollout_cache=dual", "rollout_cache_refresh=2"],
}


def _run_config(config: Path, overrides: list[str]) -> Any:
    """``config`` with ``overrides``, loaded by egspo's own loader (from this checkout's src)."""
    sys.path.insert(0, str(ROOT / "src"))
    from egspo.config import load_config

    return load_config(config, overrides)


def _at_least_one(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def equal_rollouts(config: Path, variant: str, overrides: list[str]) -> list[str]:
    """A ``max_steps`` override giving a diffu-GRPO variant as many rollouts as the EGSPO variants get."""
    if not variant.startswith("diffu_grpo"):
        return []
    cfg = _run_config(config, [*VARIANTS[variant], *overrides])
    return [f"max_steps={max(1, cfg.max_steps // cfg.gradient_accumulation_steps)}"]


def save_records(task_dir: Path, records: list[dict], command: dict) -> None:
    """Merge ``records`` into TASK_DIR/runs.json (a rerun replaces a run's record) and append ``command``
    to TASK_DIR/commands.jsonl, under a lock: commands for different seeds may finish together."""
    with (task_dir / ".runs.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = task_dir / "runs.json"
        earlier = json.loads(path.read_text()) if path.exists() else []
        names = {record["run"] for record in records}
        merged = [record for record in earlier if record["run"] not in names] + records
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged, indent=1))
        tmp.replace(path)
        with (task_dir / "commands.jsonl").open("a") as log:
            log.write(json.dumps(command) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=["sudoku", "countdown"])
    parser.add_argument("--reference-test", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--parallel", type=int, default=15, help="Runs at once.")
    parser.add_argument("--every", type=int, default=25, help="Evaluate every this many steps.")
    parser.add_argument("--out", default="runs/replication")
    parser.add_argument("--deadline", type=float, default=None, help="Seconds after which running runs stop.")
    parser.add_argument("--steps-factor", type=_at_least_one, default=1,
                        help="Run every variant this many times longer (max_steps x F; issue #20's long runs: 5).")
    parser.add_argument("overrides", nargs="*", help="field=value overrides for every run.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    task_dir = Path(args.out) / args.task
    config = ROOT / "configs" / "replication" / f"rl_{args.task}.yaml"
    try:  # a bad override fails here, once, before anything is written or started
        steps = _run_config(config, args.overrides).max_steps
        if args.steps_factor != 1:  # before diffu-GRPO's equal-rollout halving
            args.overrides = [*args.overrides, f"max_steps={steps * args.steps_factor}"]
        queue = []
        for seed in args.seeds:
            for variant in args.variants:
                out = task_dir / f"{variant}-s{seed}"
                command = [sys.executable, str(ROOT / "scripts" / "rl_curve.py"), "--config", str(config),
                           "--out", str(out), "--every", str(args.every), "--reference-test", args.reference_test,
                           f"seed={seed}", *VARIANTS[variant], *args.overrides,
                           *equal_rollouts(config, variant, args.overrides)]
                queue.append({"run": out.name, "variant": variant, "seed": seed, "out": out, "command": command})
    except ValueError as exc:  # egspo's ConfigError names the field or override
        parser.error(str(exc))
    task_dir.mkdir(parents=True, exist_ok=True)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    running: list[tuple[dict, subprocess.Popen, float]] = []
    finished: list[dict] = []
    pending = list(queue)
    try:
        while pending or running:
            while pending and len(running) < args.parallel:
                job = pending.pop(0)
                job["out"].mkdir(parents=True, exist_ok=True)
                log = (job["out"] / "log.txt").open("w")
                proc = subprocess.Popen(job["command"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
                running.append((job, proc, time.perf_counter()))
                logger.info("started %s (%d running, %d pending)", job["run"], len(running), len(pending))
            time.sleep(2)
            late = args.deadline is not None and time.perf_counter() - start > args.deadline
            for item in list(running):
                job, proc, began = item
                if late and proc.poll() is None:
                    proc.terminate()
                    proc.wait()
                    job["stopped_at_deadline"] = True
                if proc.poll() is not None:
                    running.remove(item)
                    job.update(returncode=proc.returncode, seconds=round(time.perf_counter() - began, 1),
                               concurrent_runs=min(args.parallel, len(queue)))
                    finished.append(job)
                    logger.info("finished %s rc=%s in %.0f s", job["run"], proc.returncode, job["seconds"])
            if late:
                pending.clear()
    finally:
        for _, proc, _ in running:
            proc.kill()
        records = [{k: (str(v) if isinstance(v, Path) else v) for k, v in job.items()} for job in finished]
        for record in records:
            record["command"] = shlex.join(record["command"])
        seconds = round(time.perf_counter() - start, 1)
        save_records(task_dir, records, {
            "command": shlex.join([sys.executable, *sys.argv]), "seeds": args.seeds, "variants": args.variants,
            "runs": len(queue), "finished": len(finished), "parallel": args.parallel, "seconds": seconds,
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")})
        logger.info("%d of %d runs finished in %.0f s", len(finished), len(queue), seconds)
    failed = [job["run"] for job in finished if job["returncode"] != 0]
    if failed:
        logger.error("failed runs: %s (see their log.txt)", ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
