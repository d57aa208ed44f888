"""Build the shipped tiny Sudoku base model (`builtin:sudoku-tiny`): SFT, evaluate checkpoints, pick one.

    PYTHONPATH=src python scripts/build_sudoku_base.py --out runs/sudoku-base \
        [--reference-test 4x4_test_sudoku.csv] [--target 20,50] [config overrides ...]

Runs `egspo sft` with configs/sft_sudoku_tiny.yaml, evaluates every checkpoint greedily (the built-in
default's sampler: 24 tokens, 12 steps) on held-out generated puzzles and, when given, on the
reference test set, and copies the EARLIEST checkpoint whose whole-puzzle accuracy on the generated
held-out puzzles falls in the target range into OUT/chosen (model + tokenizer). The base is meant to be
imperfect so that RL has room. Writes OUT/selection.json with every checkpoint's figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from egspo.checkpoint import list_checkpoints
from egspo.config import ModelConfig, load_config
from egspo.evaluate import evaluate_rows
from egspo.models.loading import load_model
from egspo.sft import sft
from egspo.tasks import get_task

logger = logging.getLogger("build_sudoku_base")
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sft_sudoku_tiny.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference-test", default=None, help="4x4_test_sudoku.csv (Puzzle,Solution).")
    parser.add_argument("--target", default="20,50", help="Whole-puzzle accuracy range (percent) to pick from.")
    parser.add_argument("--num-eval", type=int, default=500)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    low, high = (float(x) for x in args.target.split(","))

    cfg = load_config(CONFIG, [f"train.output_dir={out / 'sft'}", *args.overrides])
    start = time.perf_counter()
    sft(cfg)
    sft_seconds = time.perf_counter() - start

    task = get_task("sudoku")
    held_out = task.load(None, "test", args.num_eval, 1234, compact=True)
    reference = task.load(args.reference_test, "test", 0, 0, compact=True) if args.reference_test else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for ckpt in list_checkpoints(out / "sft"):
        dlm, tokenizer = load_model(ModelConfig(name_or_path=str(ckpt / "model"), dtype="float32"), device=device)
        entry = {"checkpoint": ckpt.name}
        for name, rows in (("held_out", held_out), ("reference", reference)):
            if rows is None:
                continue
            greedy = dataclasses.replace(cfg.sampler, temperature=0.0)
            _, metrics = evaluate_rows(dlm, tokenizer, task, rows, greedy, batch_size=256)
            entry[name] = metrics
        results.append(entry)
        logger.info("%s", json.dumps(entry))
    chosen = next((r for r in results if low <= r["held_out"]["puzzle_accuracy"] <= high), None)
    if chosen is not None:
        target = out / "chosen"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(out / "sft" / chosen["checkpoint"] / "model", target)
    (out / "selection.json").write_text(json.dumps(
        {"sft_seconds": sft_seconds, "device": device, "target_puzzle_accuracy": [low, high],
         "chosen": chosen, "checkpoints": results}, indent=2))
    if chosen is None:
        logger.error("No checkpoint in the target range; see %s", out / "selection.json")
        sys.exit(1)
    logger.info("Chosen %s -> %s", chosen["checkpoint"], out / "chosen")


if __name__ == "__main__":
    main()
