"""Held-out accuracy along an RL run of the demo setting (for choosing the demo length, and comparisons).

    PYTHONPATH=src python scripts/rl_curve.py --out runs/curve_egspo --every 20 [--reference-test FILE] \
        train.max_steps=200 rl.algorithm=egspo_sa

Trains with the packaged demo config plus overrides and evaluates the policy greedily on the demo's
held-out generated puzzles (and the reference test set when given) before training and every
``--every`` steps. Writes OUT/curve.json: [{step, seconds, held_out: {...}, reference: {...}}].
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from egspo.demo import EVAL_SEED, demo_config
from egspo.evaluate import evaluate_rows
from egspo.rl.trainer import RLTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--reference-test", default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    cfg = demo_config([f"train.output_dir={out}", "train.save_every=0", *args.overrides])
    trainer = RLTrainer(cfg)
    task = trainer.task
    sets = {"held_out": task.load(None, "test", cfg.task.num_eval, EVAL_SEED, **cfg.task.options)}
    if args.reference_test:
        sets["reference"] = task.load(args.reference_test, "test", 0, 0, **cfg.task.options)
    sampler = cfg.eval.sampler_for(cfg.sampler.gen_length)
    curve = []
    start = time.perf_counter()

    def record(step: int) -> None:
        entry = {"step": step, "seconds": round(time.perf_counter() - start, 1)}
        for name, rows in sets.items():
            entry[name] = evaluate_rows(trainer.dlm, trainer.tokenizer, task, rows, sampler, batch_size=256)[1]
        curve.append(entry)
        (out / "curve.json").write_text(json.dumps(curve, indent=1))
        print(json.dumps(entry), flush=True)  # noqa: T201 - a script's progress report

    record(0)
    trainer.run(on_step=lambda step, _: record(step) if step % args.every == 0 else None)


if __name__ == "__main__":
    main()
