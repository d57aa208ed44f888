"""Run metrics: one JSON object per logged step in ``metrics.jsonl``, and small summaries."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch


def step_histogram(steps: torch.Tensor, weights: torch.Tensor, num_steps: int, max_bins: int = 32) -> list[int]:
    """Counts of selected steps (weight > 0): one bin per denoising step when ``num_steps <= max_bins``,
    else ``max_bins`` equal slices of [0, num_steps)."""
    chosen = steps[weights > 0]
    if num_steps <= max_bins:
        return torch.bincount(chosen.long().flatten(), minlength=num_steps)[:num_steps].tolist()
    if chosen.numel() == 0:
        return [0] * max_bins
    return torch.histc(chosen.float(), bins=max_bins, min=0, max=num_steps).long().tolist()


class MetricsWriter:
    """Appends metrics to a JSONL file (main process only). On resume, lines past the resume step go."""

    def __init__(self, path: str | Path, enabled: bool = True, truncate_after: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = enabled
        if enabled and truncate_after is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
            self.path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
