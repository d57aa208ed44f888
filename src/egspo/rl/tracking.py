"""A few completions with their rewards, every ``logging_steps``: to ``completions.jsonl`` in the run
directory and to the trackers (a table for wandb and clearml, markdown text for tensorboard)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from accelerate import Accelerator

logger = logging.getLogger(__name__)

#: Completions kept per logged step.
SAMPLES_PER_STEP = 4
COLUMNS = ("step", "prompt", "completion", "reward")


def sample_rows(prompts: list[str], completions: list[str], rewards: list[float]) -> list[list[Any]]:
    """The first :data:`SAMPLES_PER_STEP` (prompt, completion, reward) rows of a batch."""
    return [[p, c, round(float(r), 4)] for p, c, r in
            list(zip(prompts, completions, rewards, strict=True))[:SAMPLES_PER_STEP]]


def log_samples(accelerator: Accelerator, run_dir: Path, samples: list[list[Any]], step: int) -> None:
    """Append ``samples`` (of :func:`sample_rows`) at ``step`` to ``completions.jsonl`` and send them to every
    tracker that shows text."""
    if not accelerator.is_main_process or not samples:
        return
    rows = [[step, *sample] for sample in samples]
    with (run_dir / "completions.jsonl").open("a") as handle:
        for row in rows:
            handle.write(json.dumps(dict(zip(COLUMNS, row, strict=True))) + "\n")
    for tracker in accelerator.trackers:
        try:
            if tracker.name in ("wandb", "clearml"):
                tracker.log_table("completions", columns=list(COLUMNS), data=rows, step=step)
            elif tracker.name == "tensorboard":
                table = "\n".join(["| reward | prompt | completion |", "|---|---|---|"] + [
                    f"| {r[3]} | {_cell(r[1])} | {_cell(r[2])} |" for r in rows])
                tracker.writer.add_text("completions", table, global_step=step)
        except Exception as exc:  # a tracker's display problem must not stop training
            logger.warning("Could not log completions to %s: %s", tracker.name, exc)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")[-400:]
