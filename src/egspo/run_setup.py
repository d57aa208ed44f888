"""What every training command sets up the same way: the accelerator, the run directory, the optimizer."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from egspo.config import ConfigError, TrainConfig


def make_accelerator(train: TrainConfig) -> Accelerator:
    """An Accelerator for ``train``: bf16 on GPU for mixed_precision=auto, a CPU process group without CUDA."""
    mixed = train.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # so CPU launches of several processes form one gloo group
        mixed_precision=mixed,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        log_with=train.report_to or None,
        project_dir=train.output_dir,
    )


def check_output_dir(path: Path) -> None:
    """Create the run directory and prove it writable, or fail naming train.output_dir."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        # a file of its own: every process of a launch probes the same directory at the same time
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"train.output_dir={str(path)!r} is not writable: {exc}") from exc


def make_optimizer(
    params: list[torch.nn.Parameter], train: TrainConfig, optimizer_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with the configured betas and weight decay, and the warm-up + constant/cosine schedule."""
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                                  weight_decay=train.weight_decay)
    scheduler = get_scheduler("constant_with_warmup" if train.lr_scheduler == "constant" else "cosine",
                              optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=optimizer_steps)
    return optimizer, scheduler
