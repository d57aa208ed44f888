"""Reward scoring for RL: a task's reward functions plus user functions, weighted and checked.

User functions use the TRL signature ``fn(prompts, completions, completion_ids, **columns) ->
list[float | None]``: plain functions, partials, objects with ``__call__``, or import paths
(``"my_rewards:length_penalty"``); their signatures are checked before any rollout. A ``None`` or NaN reward is
excluded from the weighted sum (as TRL does), counted, and warned about once per function. A function that raises
stops the run with a message naming it: a silently zero reward would train on garbage.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from egspo.tasks.base import RewardFunction, Task

logger = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A reward function failed or returned something unusable."""


def import_reward_function(spec: str) -> Callable[..., Any]:
    """The callable named by ``module:function``; the working directory is importable (as with ``python -m``)."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(
            f"Reward function {spec!r}: cannot import module {module_name!r} ({exc}). The working directory "
            f"{os.getcwd()} and PYTHONPATH are searched: run from the directory holding {module_name}.py or add "
            "its directory to PYTHONPATH."
        ) from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"Reward function {spec!r}: module {module_name!r} has no callable {attr!r}.")
    return fn


def reward_name(fn: Any) -> str:
    """A reward function's name in metrics: the function's, the partial's function's, or the class's."""
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    name = getattr(fn, "__name__", None)
    return str(name) if name else type(fn).__name__


#: Keyword arguments the trainer passes to every reward function besides the dataset columns.
TRAINER_KWARGS = ("prompts", "completions", "completion_ids")


def check_signature(fn: Any, name: str, columns: Sequence[str]) -> None:
    """Fail before any rollout when ``fn`` cannot take the TRL reward call
    ``fn(prompts=..., completions=..., completion_ids=..., **columns)``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return  # builtins and C callables: nothing to check
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params) and not any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        raise RewardError(f"Reward function {name!r} takes *args only; it is called with keyword arguments "
                          f"({', '.join(TRAINER_KWARGS)} and the dataset columns): add **kwargs.")
    passed = {*TRAINER_KWARGS, *columns}
    named = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                   inspect.Parameter.KEYWORD_ONLY)}
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name in named - passed]
    if missing:
        raise RewardError(
            f"Reward function {name!r} needs argument(s) {missing} that are not dataset columns (columns: "
            f"{', '.join(columns) or 'none'}); rewards are called as fn(prompts, completions, completion_ids, "
            "**columns).")
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        extra = sorted(passed - named)
        if extra:
            raise RewardError(
                f"Reward function {name!r} does not accept {extra}, which every call passes (TRL signature "
                "fn(prompts, completions, completion_ids, **columns)): add **kwargs to its signature.")


def as_reward_function(fn: Any, correctness: bool) -> RewardFunction:
    """A user's reward: a callable (function, partial, object with ``__call__``) or a ``module:function``
    string, weight 1. A ``correctness`` attribute on the callable overrides ``correctness``."""
    if isinstance(fn, str):
        if ":" not in fn:
            raise RewardError(f"Reward function {fn!r} is not 'module:function' (e.g. 'my_rewards:exact_match').")
        fn = import_reward_function(fn)
    if not callable(fn):
        raise RewardError(f"Reward function {fn!r} is neither callable nor a 'module:function' string.")
    return RewardFunction(name=reward_name(fn), fn=fn, weight=1.0,
                          correctness=bool(getattr(fn, "correctness", correctness)), builtin=False)


@dataclass
class RewardScorer:
    """Scores completions with weighted reward functions; keeps running counts of missing rewards."""

    functions: list[RewardFunction]
    missing: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, task_functions: Sequence[RewardFunction], user: Sequence[Any] = (),
              weights: Sequence[float] | None = None, columns: Sequence[str] | None = None) -> RewardScorer:
        """The task's functions, then the user's (callables or ``module:function``), optionally re-weighted.
        User functions count as correctness rewards when they are the whole reward (no task functions).
        With ``columns`` (the dataset's), every signature is checked against the call it will get."""
        functions = list(task_functions) + [as_reward_function(fn, correctness=not task_functions) for fn in user]
        if not functions:
            raise RewardError("There are no reward functions: pass reward_funcs=[...] (callables or "
                              "'module:function') or use a built-in task.")
        names = [f.name for f in functions]
        for name in {n for n in names if names.count(n) > 1}:
            raise RewardError(f"Two reward functions are named {name!r}; their metrics would collide: rename one.")
        if weights is not None:
            if len(weights) != len(functions):
                raise RewardError(
                    f"reward_weights has {len(weights)} entries but there are {len(functions)} reward functions "
                    f"({', '.join(names)})."
                )
            functions = [dataclasses.replace(f, weight=float(w)) for f, w in zip(functions, weights, strict=True)]
        if columns is not None:
            for f in functions:
                if not f.builtin:
                    check_signature(f.fn, f.name, columns)
        return cls(functions)

    @classmethod
    def for_task(cls, task: Task, extra: Sequence[Any] = (), weights: Sequence[float] | None = None) -> RewardScorer:
        """The task's reward functions plus ``extra`` ones."""
        return cls.build(task.reward_functions(), extra, weights)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[str],
        rows: Sequence[dict[str, Any]],
        correctness_only: bool = False,
        completion_ids: Sequence[list[int]] | None = None,
        conversational: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(total (N,), per-function (N, F) with NaN where a function gave no reward).

        Every function is called as ``fn(prompts=, completions=, completion_ids=, **columns)`` (TRL); with
        ``conversational`` prompts, user functions get each completion as ``[{"role": "assistant", ...}]``
        (the task's own functions always get text)."""
        columns: dict[str, list[Any]] = {}
        for key in rows[0] if rows else {}:
            if key not in TRAINER_KWARGS:
                columns[key] = [row.get(key) for row in rows]
        as_messages = [[{"role": "assistant", "content": text}] for text in completions] if conversational else None
        ids = [list(x) for x in completion_ids] if completion_ids is not None else [[] for _ in completions]
        per_fn = torch.full((len(completions), len(self.functions)), float("nan"))
        for j, reward in enumerate(self.functions):
            if correctness_only and not reward.correctness:
                continue
            try:
                given = as_messages if as_messages is not None and not reward.builtin else list(completions)
                values = reward.fn(prompts=list(prompts), completions=given, completion_ids=ids, **columns)
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
