"""Accuracy along an RL run: evaluate the policy before training and every few steps.

    PYTHONPATH=src python scripts/rl_curve.py --out runs/curve_egspo --every 20 \
        [--config configs/replication/rl_sudoku.yaml] [--reference-test FILE] \
        max_steps=200 algorithm=egspo_sa

Trains with the config (default: the packaged demo config) plus overrides and evaluates the policy
greedily (the config's eval sampler) on ``num_eval`` held-out generated problems and on the
reference test set when given, before training and every ``--every`` steps. Writes
OUT/curve.json: [{step, rollouts, seconds, train_seconds, held_out: {...}, reference: {...}}], where
``seconds`` is wall time since the start (evaluations included) and ``train_seconds`` the time spent
in rollout, scoring and updates only. The run's metrics.jsonl and config.yaml are in OUT too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from egspo.config import load_config
from egspo.demo import EVAL_SEED, demo_config
from egspo.evaluate import evaluate_rows, get_task_or_fail
from egspo.rl.trainer import EGSPOTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", default=None, help="A training config (default: the packaged demo config).")
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--reference-test", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    overrides = [f"output_dir={out}", "save_steps=0", *args.overrides, "logging_steps=1"]
    cfg = load_config(args.config, overrides) if args.config else demo_config(overrides)
    trainer = EGSPOTrainer(args=cfg)
    task = get_task_or_fail(cfg.task)
    options = cfg.task_options
    sets = {"held_out": task.load(None, "test", cfg.num_eval, EVAL_SEED, **options)}
    if args.reference_test:
        sets["reference"] = task.load(args.reference_test, "test", 0, 0, **options)
    sampler = cfg.eval_config().sampler_for(cfg.max_completion_length)
    batches_per_step = cfg.gradient_accumulation_steps if cfg.algorithm == "diffu_grpo" else 1  # d1's schedule
    rollouts_per_step = cfg.per_device_train_batch_size * trainer.accelerator.num_processes * batches_per_step
    curve: list[dict] = []
    start = time.perf_counter()
    train_seconds = 0.0

    def record(step: int) -> None:
        entry = {"step": step, "rollouts": step * rollouts_per_step,
                 "seconds": round(time.perf_counter() - start, 1), "train_seconds": round(train_seconds, 1)}
        for name, rows in sets.items():
            entry[name] = evaluate_rows(trainer.dlm, trainer.processing_class, task, rows, sampler,
                                        batch_size=cfg.per_device_eval_batch_size)[1]
        curve.append(entry)
        if trainer.accelerator.is_main_process:
            (out / "curve.json").write_text(json.dumps(curve, indent=1))
            sys.stdout.write(json.dumps(entry) + "\n")
            sys.stdout.flush()

    class Curve:  # a trainer callback: logs arrive every step (logging_steps=1)
        def on_log(self, args_, state, control, logs=None, **kwargs) -> None:
            nonlocal train_seconds
            train_seconds += sum(v for k, v in (logs or {}).items() if k.startswith("time/"))
            if state.global_step % args.every == 0 or state.global_step == cfg.max_steps:
                record(state.global_step)

    record(0)
    trainer.callbacks.callbacks.append(Curve())
    trainer.train()


if __name__ == "__main__":
    main()
