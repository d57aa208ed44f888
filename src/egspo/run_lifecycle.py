"""The life cycle that every training command shares around its own step: ``EGSPOTrainer.train``
(``egspo train``) and :func:`egspo.sft.sft` (``egspo sft``).

    run = RunLifecycle(cfg, accelerator)      # refuses a launch that accelerate did not join
    with run.opened(resume) as checkpoint:    # fresh or resumed; a failed start leaves nothing behind
        step = run.load(checkpoint, ...)["step"] if checkpoint else 0
        if not run.finished(step):
            metrics = run.begin(step)         # config.yaml, metrics.jsonl (cut after ``step``)
            with StopFlag() as stop:
                ...                           # each of the trainer's own steps, then:
                signum = stop.agreed(accelerator)
                if run.checkpoint_due(step, bool(signum)):  # the last step, every save_steps, a signal
                    run.save(step, ...)
                if signum:
                    raise TrainingInterrupted(signum, step, run.run_dir)

A trainer supplies its step, what its checkpoints record and when it evaluates; the optimizer step
itself is :func:`egspo.run_setup.optimizer_step`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from egspo.checkpoint import (
    check_fresh_or_resume,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from egspo.config import ConfigError, EGSPOConfig, save_config
from egspo.rl.distributed import check_launch
from egspo.rl.metrics import MetricsWriter
from egspo.run_setup import check_output_dir

logger = logging.getLogger(__name__)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM after saving a checkpoint; ``signum`` says which signal."""

    def __init__(self, signum: int, step: int, run_dir: Path) -> None:
        super().__init__(f"stopped at step {step} by signal {signum}; checkpoint saved in {run_dir}")
        self.signum, self.step, self.run_dir = signum, step, run_dir


class StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint after the current step and stops. A second signal
    stops at once (KeyboardInterrupt, no checkpoint)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second signal {signum}: stopping now, without a checkpoint")
        logger.warning("Received signal %d: finishing this step, saving a checkpoint and stopping "
                       "(send it again to stop at once).", signum)
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, accelerator: Accelerator) -> int:
        """The largest signal number that any process received (0: none), so that every process saves and
        stops at the same step. A collective: every process calls it once per step."""
        local = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        return int(accelerator.gather(local).max())


def check_writable_target(path: Path) -> None:
    """Refuse an output_dir that cannot be created or written, without creating it (nothing half-made)."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"output_dir={str(path)!r} is not writable: {probe} is a file.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={str(path)!r} is not writable: no write permission in {probe}.")


class RunLifecycle:
    """The run directory of one training run and what happens to it: start (fresh or resumed), config and
    metrics files, checkpoints, and clean-up after a failed start. Creating it runs the launch check."""

    def __init__(self, cfg: EGSPOConfig, accelerator: Accelerator) -> None:
        check_launch(accelerator.num_processes)
        self.cfg, self.accelerator = cfg, accelerator
        self.run_dir = Path(cfg.output_dir)

    def resume_point(self, resume: bool | str | Path | None) -> Path | None:
        """The checkpoint to continue from: None for a fresh run (refused over an old run's checkpoints), the
        newest intact one for ``True`` (None, with a warning, when there is none), or the named directory."""
        if not resume:
            check_fresh_or_resume(self.run_dir, resume=False)
            return None
        if resume is True:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                logger.warning("resume_from_checkpoint: no checkpoint in %s, starting from scratch.", self.run_dir)
            return ckpt
        path = Path(resume)
        if not (path / "trainer_state.json").is_file():
            raise ConfigError(f"resume_from_checkpoint={str(path)!r} is not a checkpoint directory "
                              "(no trainer_state.json).")
        verify_checkpoint(path)  # a named checkpoint is never swapped for another: damaged is an error
        return path

    @contextmanager
    def opened(self, resume: bool | str | Path | None) -> Iterator[Path | None]:
        """Resolve ``resume`` (:meth:`resume_point`), create the run directory and yield the checkpoint to
        load (None: a fresh start). When the block fails and this call created the directory, it is
        removed unless a checkpoint was written (nothing half-made)."""
        ckpt = self.resume_point(resume)
        created = not self.run_dir.exists()
        check_output_dir(self.run_dir)
        try:
            yield ckpt
        except BaseException:
            if created and self.accelerator.is_main_process and not list_checkpoints(self.run_dir):
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def load(self, checkpoint: Path, *, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        """Restore a checkpoint into the prepared model, optimizer and scheduler; return its trainer state."""
        return load_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler,
                               process_index=self.accelerator.process_index)

    def finished(self, step: int) -> bool:
        """Whether a run resumed at ``step`` has nothing left to do (and says so)."""
        if step < self.cfg.max_steps:
            return False
        logger.info("%s already finished (step %d of max_steps=%d): nothing to do.", self.run_dir, step,
                    self.cfg.max_steps)
        return True

    def begin(self, step: int) -> MetricsWriter:
        """Write the resolved config.yaml and open metrics.jsonl, dropping any lines after ``step``."""
        main = self.accelerator.is_main_process
        if main:
            save_config(self.cfg, self.run_dir / "config.yaml")
        return MetricsWriter(self.run_dir / "metrics.jsonl", enabled=main, truncate_after=step)

    def checkpoint_due(self, step: int, *requests: bool) -> bool:
        """Whether ``checkpoint-{step}`` is to be written: the last step, every ``save_steps``, or any of the
        trainer's ``requests`` (a stop, a better evaluation, a callback's ``should_save``)."""
        save_steps = self.cfg.save_steps
        return any(requests) or step == self.cfg.max_steps or bool(save_steps and step % save_steps == 0)

    def save(self, step: int, *, model: nn.Module, optimizer: Any, scheduler: Any, tokenizer: Any,
             trainer_state: dict[str, Any], protect: Path | None = None) -> Path:
        """Write ``checkpoint-{step}`` (every process calls it), keeping the last ``save_total_limit``."""
        acc = self.accelerator
        return save_checkpoint(
            self.run_dir, step, model=model, optimizer=optimizer, scheduler=scheduler, config=self.cfg,
            trainer_state=trainer_state, process_index=acc.process_index, num_processes=acc.num_processes,
            wait=acc.wait_for_everyone, keep_last=self.cfg.save_total_limit, tokenizer=tokenizer, protect=protect,
        )
