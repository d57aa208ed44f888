"""Trainer callbacks in the transformers convention: ``TrainerCallback`` objects whose ``on_*`` methods get
``(args, state, control, **kwargs)``.

    class StopWhenSolved(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and logs.get("accuracy", 0) > 90:
                control.should_training_stop = True

    EGSPOTrainer(..., callbacks=[StopWhenSolved()])

Events: ``on_train_begin``, ``on_step_begin``, ``on_step_end``, ``on_log`` (``logs=`` the step's
metrics), ``on_evaluate`` (``metrics=``), ``on_save`` (``checkpoint=`` its directory) and
``on_train_end``; every call also gets ``trainer=`` the EGSPOTrainer. ``state.global_step`` counts
training steps (rollout batches). Setting ``control.should_training_stop`` ends the run after the step
(with a checkpoint); ``control.should_save`` asks for a checkpoint after it. Any object with some of
these methods will do; the others are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers.trainer_callback import TrainerControl, TrainerState

EVENTS = ("on_train_begin", "on_step_begin", "on_step_end", "on_log", "on_evaluate", "on_save", "on_train_end")


class CallbackHandler:
    """Calls every callback's handler of an event, with the run's args, state and control."""

    def __init__(self, callbacks: Sequence[Any], args: Any, max_steps: int) -> None:
        for callback in callbacks:
            if not any(callable(getattr(callback, event, None)) for event in EVENTS):
                raise TypeError(
                    f"Callback {callback!r} has none of the methods {', '.join(EVENTS)}: pass a "
                    "transformers.TrainerCallback (or an object with some of these methods)."
                )
        self.callbacks = list(callbacks)
        self.args = args
        self.state = TrainerState(max_steps=max_steps)
        self.control = TrainerControl()

    def __call__(self, event: str, **kwargs: Any) -> TrainerControl:
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if callable(handler):
                result = handler(self.args, self.state, self.control, **kwargs)
                if isinstance(result, TrainerControl):
                    self.control = result
        return self.control
