"""The built-in default job: EGSPO-SA on 4x4 Sudoku from the shipped tiny base model, on a CPU.

    egspo demo [--out DIR] [field=value ...]

1. evaluate the base model (`builtin:sudoku-tiny`) greedily on held-out generated puzzles,
2. train it with EGSPO-SA on generated puzzles (configs/demo_sudoku.yaml inside the package) through
   :class:`~egspo.rl.trainer.EGSPOTrainer`, the engine of every entry point,
3. evaluate the trained policy on the same puzzles,
4. print a before/after table and write ``report.md``, ``training_curve.png``, ``demo_results.json``
   next to the run's checkpoints and ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import logging
import time
from importlib import resources
from pathlib import Path
from typing import Any

from egspo.config import EGSPOConfig, load_config
from egspo.evaluate import get_task_or_fail
from egspo.report import write_run_report
from egspo.rl.metrics import read_metrics
from egspo.rl.trainer import EGSPOTrainer

logger = logging.getLogger(__name__)

#: Seed of the held-out evaluation puzzles (generated test split; never seen in training).
EVAL_SEED = 1234


def demo_config(overrides: list[str] | None = None) -> EGSPOConfig:
    """The packaged demo config with ``field=value`` overrides."""
    path = resources.files("egspo") / "configs" / "demo_sudoku.yaml"
    with resources.as_file(path) as file:
        return load_config(file, overrides or [])


def default_output_dir(root: str = "runs") -> Path:
    """``runs/demo``, or ``runs/demo-2``, ``-3``... when earlier demos are there."""
    base = Path(root) / "demo"
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = Path(f"{base}-{n}")
    return candidate


def _evaluate(trainer: EGSPOTrainer, rows: list[dict[str, Any]]) -> dict[str, float]:
    start = time.perf_counter()
    metrics = trainer.evaluate(eval_dataset=rows)
    return {"accuracy": metrics["eval_accuracy"], "puzzle_accuracy": metrics["eval_puzzle_accuracy"],
            "seconds": time.perf_counter() - start}


def format_table(before: dict[str, float], after: dict[str, float]) -> str:
    lines = [
        f"{'':16}{'cell acc %':>12}{'puzzle acc %':>14}{'eval s':>9}",
        f"{'base':16}{before['accuracy']:>12.1f}{before['puzzle_accuracy']:>14.1f}{before['seconds']:>9.1f}",
        f"{'EGSPO-SA':16}{after['accuracy']:>12.1f}{after['puzzle_accuracy']:>14.1f}{after['seconds']:>9.1f}",
    ]
    return "\n".join(lines)


def demo_preface(cfg: EGSPOConfig, before: dict[str, float], after: dict[str, float], train_seconds: float,
                 total_seconds: float, n_eval: int) -> str:
    """The before/after part of the demo's report.md."""
    return f"""EGSPO-SA on 4x4 Sudoku: {n_eval} held-out generated puzzles (8 blanks, unique solutions), greedy
decoding, {cfg.max_completion_length} tokens in {cfg.eval_config().sampler_for(cfg.max_completion_length).steps} steps.

```
{format_table(before, after)}
```

Training took {train_seconds:.0f} s; the whole job {total_seconds:.0f} s. Cell accuracy is the share of empty
cells filled correctly (the reference protocol); puzzle accuracy the share of puzzles solved completely."""


def run_demo(overrides: list[str] | None = None, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the whole demo; returns the before/after figures (also in ``demo_results.json``)."""
    started = time.perf_counter()
    out = Path(output_dir) if output_dir is not None else default_output_dir()
    cfg = demo_config([f"output_dir={out}", *(overrides or [])])
    trainer = EGSPOTrainer(args=cfg)
    rows = get_task_or_fail(cfg.task).load(cfg.eval_file, "test", cfg.num_eval, EVAL_SEED, **cfg.task_options)
    logger.info("Evaluating the base model on %d held-out puzzles...", len(rows))
    before = _evaluate(trainer, rows)
    logger.info("Base: cell accuracy %.1f%%, puzzle accuracy %.1f%%", before["accuracy"], before["puzzle_accuracy"])
    t0 = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - t0
    logger.info("Evaluating the trained model...")
    after = _evaluate(trainer, rows)
    total = time.perf_counter() - started
    report = write_run_report(out, cfg, read_metrics(out / "metrics.jsonl"),
                              preface=demo_preface(cfg, before, after, train_seconds, total, len(rows)))
    results = {"base": before, "trained": after, "train_seconds": train_seconds, "total_seconds": total,
               "run_dir": str(out), "report": str(report)}
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    return results
