"""Reward scoring for RL: a task's reward functions plus user functions, weighted and checked.

User functions use the TRL signature ``fn(prompts, completions, **columns) -> list[float | None]`` and
are named by import path (``"my_rewards:length_penalty"``). A ``None`` or NaN reward is excluded from
the weighted sum (as TRL does), counted, and warned about once per function. A function that raises
stops the run with a message naming it: a silently zero reward would train on garbage.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from egspo.tasks.base import RewardFunction, Task

logger = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable."""


def import_reward_function(spec: str) -> RewardFunction:
    """Import ``module:function`` as a reward function of weight 1 (not a correctness reward)."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"Reward function {spec!r}: cannot import module {module_name!r} ({exc}).") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"Reward function {spec!r}: module {module_name!r} has no callable {attr!r}.")
    return RewardFunction(name=attr, fn=fn, weight=1.0, correctness=False)


@dataclass
class RewardScorer:
    """Scores completions with weighted reward functions; keeps running counts of missing rewards."""

    functions: list[RewardFunction]
    missing: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_task(cls, task: Task, extra: Sequence[str] = (), weights: Sequence[float] | None = None) -> RewardScorer:
        functions = list(task.reward_functions()) + [import_reward_function(s) for s in extra]
        if weights is not None:
            if len(weights) != len(functions):
                names = ", ".join(f.name for f in functions)
                raise RewardError(
                    f"task.reward_weights has {len(weights)} entries but there are {len(functions)} reward "
                    f"functions ({names})."
                )
            functions = [
                RewardFunction(f.name, f.fn, float(w), f.correctness) for f, w in zip(functions, weights, strict=True)
            ]
        if not functions:
            raise RewardError(f"Task {task.name!r} has no reward functions.")
        return cls(functions)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[str],
        rows: Sequence[dict[str, Any]],
        correctness_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(total (N,), per-function (N, F) with NaN where a function gave no reward)."""
        columns: dict[str, list[Any]] = {}
        for key in rows[0] if rows else {}:
            columns[key] = [row.get(key) for row in rows]
        per_fn = torch.full((len(completions), len(self.functions)), float("nan"))
        for j, reward in enumerate(self.functions):
            if correctness_only and not reward.correctness:
                continue
            try:
                values = reward.fn(prompts=list(prompts), completions=list(completions), **columns)
            except Exception as exc:
                raise RewardError(f"Reward function {reward.name!r} raised {type(exc).__name__}: {exc}") from exc
            if len(values) != len(completions):
                raise RewardError(
                    f"Reward function {reward.name!r} returned {len(values)} values for {len(completions)} completions."
                )
            clean = [math.nan if v is None else float(v) for v in values]
            per_fn[:, j] = torch.tensor(clean)
            bad = sum(math.isnan(v) for v in clean)
            if bad:
                if reward.name not in self.missing:
                    logger.warning("Reward function %r gave None/NaN for %d completion(s); excluded from the sum "
                                   "(counted in metrics as rewards/missing).", reward.name, bad)
                self.missing[reward.name] = self.missing.get(reward.name, 0) + bad
        weights = torch.tensor([f.weight for f in self.functions])
        if correctness_only:
            weights = weights * torch.tensor([float(f.correctness) for f in self.functions])
        total = torch.nansum(per_fn * weights, dim=1)
        return total, per_fn
