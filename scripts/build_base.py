"""Build an imperfect base model by masked-diffusion SFT: train, evaluate checkpoints, pick one.

    PYTHONPATH=src python scripts/build_base.py --out runs/sudoku-base \
        [--config configs/sft_sudoku_tiny.yaml] [--reference-test 4x4_test_sudoku.csv] [--target 25,45] \
        [config overrides ...]

Runs `egspo sft` with the config, evaluates every checkpoint greedily with the config's sampler on
held-out generated problems of the config's task (and on a reference test set when given), and copies
the EARLIEST checkpoint whose accuracy on the generated held-out problems falls in the target range
into OUT/chosen (model + tokenizer). SFT runs in a subprocess and each checkpoint is evaluated as soon
as it is written; SFT stops at the first checkpoint in range (with ``--all`` it runs to
``max_steps`` and every checkpoint is evaluated), so ``max_steps`` is only an upper bound. The
reference test set is reported, never used for the choice.
The accuracy is the task's whole-answer figure: ``puzzle_accuracy`` for Sudoku, ``accuracy`` for the
others (``--metric`` to choose another). The base is meant to be imperfect so that RL has room.
Writes OUT/selection.json with every checkpoint's figures. This is how `builtin:sudoku-tiny` and the
replication bases (configs/replication/) were made.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from egspo.checkpoint import check_fresh_or_resume, list_checkpoints
from egspo.config import ModelConfig, load_config
from egspo.demo import EVAL_SEED
from egspo.evaluate import evaluate_rows
from egspo.models.loading import load_model
from egspo.tasks import get_task

logger = logging.getLogger("build_base")
POLL_SECONDS = 2.0
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sft_sudoku_tiny.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="An SFT config (default: the tiny Sudoku one).")
    parser.add_argument("--reference-test", default=None, help="A test file of the task, e.g. 4x4_test_sudoku.csv.")
    parser.add_argument("--target", default="20,50", help="Held-out accuracy range (percent) to pick from.")
    parser.add_argument("--metric", default=None, help="Metric to pick by (default: puzzle_accuracy or accuracy).")
    parser.add_argument("--num-eval", type=int, default=500)
    parser.add_argument("--all", action="store_true", help="Evaluate every checkpoint, not only up to the chosen one.")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    low, high = (float(x) for x in args.target.split(","))

    overrides = [f"output_dir={out / 'sft'}", *args.overrides]
    cfg = load_config(args.config, overrides)  # fails fast on a bad config, before SFT starts
    # SFT would refuse an old run's checkpoints, but they would be evaluated (and chosen) here first
    check_fresh_or_resume(out / "sft", resume=False)
    task = get_task(cfg.task)
    options = cfg.task_options
    sets = {"held_out": task.load(None, "test", args.num_eval, EVAL_SEED, **options)}
    if args.reference_test:
        sets["reference"] = task.load(args.reference_test, "test", 0, 0, **options)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    greedy = dataclasses.replace(cfg.rollout_sampler(), temperature=0.0)
    metric = args.metric
    results: list[dict] = []
    chosen = None

    # SFT runs in its own process; each checkpoint is evaluated as soon as it is complete (checkpoints
    # are renamed into place whole), and SFT is stopped at the first one in range unless --all.
    # SFT keeps only save_total_limit checkpoints and goes on saving while one is evaluated, so each is
    # copied first (OUT/evaluating, renamed to OUT/chosen when chosen); one pruned before it is copied
    # is skipped.
    staging, target = out / "evaluating", out / "chosen"
    command = [sys.executable, "-m", "egspo.cli", "sft", "--config", args.config, *overrides]
    logger.info("SFT: %s", shlex.join(command))
    start = time.perf_counter()
    sft_seconds = None
    proc = subprocess.Popen(command)
    try:
        done: set[str] = set()
        while True:
            finished = proc.poll() is not None
            if finished and sft_seconds is None:
                sft_seconds = time.perf_counter() - start
            pending = [c for c in list_checkpoints(out / "sft") if c.name not in done]
            if not pending:
                if finished:
                    break
                time.sleep(POLL_SECONDS)
                continue
            ckpt = pending[0]
            done.add(ckpt.name)
            shutil.rmtree(staging, ignore_errors=True)
            try:
                shutil.copytree(ckpt / "model", staging)
            except (FileNotFoundError, shutil.Error) as exc:
                if ckpt in list_checkpoints(out / "sft")[-cfg.save_total_limit:]:
                    raise  # not being pruned: a broken checkpoint
                logger.warning("%s was deleted (save_total_limit) before it was evaluated: %s", ckpt.name, exc)
                continue
            dlm, tokenizer = load_model(ModelConfig(name_or_path=str(staging), dtype="float32"), device=device)
            entry: dict = {"checkpoint": ckpt.name, "seconds_since_start": round(time.perf_counter() - start, 1)}
            for name, rows in sets.items():
                entry[name] = evaluate_rows(dlm, tokenizer, task, rows, greedy, batch_size=256)[1]
            del dlm
            results.append(entry)
            logger.info("%s", json.dumps(entry))
            metric = metric or ("puzzle_accuracy" if "puzzle_accuracy" in entry["held_out"] else "accuracy")
            if chosen is None and low <= entry["held_out"][metric] <= high:
                chosen = entry
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
                if not args.all:
                    break
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
            sft_seconds = time.perf_counter() - start
        shutil.rmtree(staging, ignore_errors=True)
    # 143: egspo sft stopped by our SIGTERM after saving a checkpoint (its exit code for SIGTERM)
    failed = proc.returncode not in (0, 143, -signal.SIGTERM) and chosen is None
    (out / "selection.json").write_text(json.dumps(  # also when SFT failed: keeps what was evaluated
        {"config": args.config, "sft_seconds": sft_seconds, "sft_exit_code": proc.returncode, "device": device,
         "metric": metric, "target": [low, high], "chosen": chosen, "checkpoints": results}, indent=2))
    if failed:
        logger.error("SFT failed (exit code %s); evaluations so far in %s", proc.returncode, out / "selection.json")
        sys.exit(1)
    if chosen is None:
        logger.error("No checkpoint has held-out %s in %s-%s%%; see %s", metric, low, high, out / "selection.json")
        sys.exit(1)
    logger.info("Chosen %s -> %s", chosen["checkpoint"], out / "chosen")


if __name__ == "__main__":
    main()
