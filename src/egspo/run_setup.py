"""What every training command sets up the same way: the accelerator, the run directory, the optimizer,
``prepare`` (with what DeepSpeed needs told), the KL reference's preparation, gradient clipping and the
optimizer step. The run's life cycle around the steps is :mod:`egspo.run_lifecycle`."""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from egspo.config import ConfigError, EGSPOConfig

logger = logging.getLogger(__name__)


def make_accelerator(train: EGSPOConfig) -> Accelerator:
    """An Accelerator for ``train``: bf16 on GPU unless ``bf16`` says otherwise, a CPU process group without CUDA."""
    bf16 = torch.cuda.is_available() if train.bf16 is None else train.bf16
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # so CPU launches of several processes form one gloo group
        mixed_precision="bf16" if bf16 else "no",
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        log_with=train.report_to or None,
        project_dir=train.output_dir,
    )


def check_output_dir(path: Path) -> None:
    """Create the run directory and prove it writable, or fail naming output_dir."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        # a file of its own: every process of a launch probes the same directory at the same time
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"output_dir={str(path)!r} is not writable: {exc}") from exc


def make_optimizer(
    params: list[torch.nn.Parameter], train: EGSPOConfig, optimizer_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with the configured betas and weight decay, and the warm-up + constant/cosine schedule."""
    optimizer = torch.optim.AdamW(params, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                                  weight_decay=train.weight_decay)
    scheduler = get_scheduler("constant_with_warmup" if train.lr_scheduler_type == "constant" else "cosine",
                              optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=optimizer_steps)
    return optimizer, scheduler


def configure_deepspeed(accelerator: Accelerator, train: EGSPOConfig) -> None:
    """Tell the DeepSpeed plugin (if any) what it would otherwise read from a dataloader or default.

    accelerate takes the micro-batch size from a prepared dataloader, and egspo prepares none: the
    micro-batch is ``per_device_train_batch_size`` rows. DeepSpeed clips gradients itself, by its
    ``gradient_clipping`` (accelerate fills "auto" with 1.0): it is set to ``max_grad_norm``,
    so the config stays the one source of truth (0 = no clipping, as in DeepSpeed).
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = train.per_device_train_batch_size
    previous = config.get("gradient_clipping", "auto")
    if previous != "auto" and float(previous) != float(train.max_grad_norm):
        logger.warning("DeepSpeed gradient_clipping=%s replaced by max_grad_norm=%s.", previous,
                       train.max_grad_norm)
    config["gradient_clipping"] = float(train.max_grad_norm)


def prepare_model_and_optimizer(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train: EGSPOConfig,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """``accelerator.prepare(model, optimizer)`` under DDP, FSDP or DeepSpeed (see :func:`configure_deepspeed`)."""
    configure_deepspeed(accelerator, train)
    return accelerator.prepare(model, optimizer)


def prepare_reference(accelerator: Accelerator, reference: torch.nn.Module | None) -> torch.nn.Module | None:
    """The frozen KL reference of full fine-tuning, ready to run; call it after :func:`prepare_model_and_optimizer`.

    Under DeepSpeed ZeRO-3 the reference gets its own inference-only ZeRO-3 engine (as TRL prepares
    its reference model): the policy engine's config, with the values accelerate filled in, without
    an optimizer or scheduler. Its weights are partitioned like the policy's, and each of its forwards
    is a collective, which the trainer runs in step on every process (one per selected-step slot or
    diffu-GRPO iteration). Otherwise (DDP, FSDP, ZeRO-2) the reference stays a whole copy on each
    process, as it is.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if reference is None or plugin is None or plugin.zero_stage != 3:
        return reference
    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=reference, config=config)
    engine.eval()
    logger.info("KL reference: its own DeepSpeed ZeRO-3 engine (no optimizer).")
    return engine


def clip_gradients(accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> float | None:
    """Clip the synchronised gradients of ``model`` to ``max_norm``; return their norm before clipping.

    All of the prepared model's parameters are passed (frozen ones have no gradient): accelerate runs
    FSDP's sharded clipping only for exactly ``model.parameters()``; a subset (the LoRA weights) would
    be clipped by each process's local shard norm. Under DeepSpeed the engine has already clipped (by
    ``gradient_clipping``, see :func:`configure_deepspeed`) and this only reads the norm (None before
    the engine's first step).
    """
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
    if norm is None:
        return None
    if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
        norm = norm.full_tensor()
    return float(norm)


def optimizer_step(
    accelerator: Accelerator, model: torch.nn.Module, optimizer: Any, scheduler: Any, max_grad_norm: float
) -> float | None:
    """End of an accumulation cycle: clip (unless ``max_grad_norm`` is 0), step the optimizer and the
    schedule, drop the gradients. Call it after every backward inside ``accelerator.accumulate``: between
    cycles (``accelerator.sync_gradients`` false) it does nothing. Returns the gradient norm before
    clipping, None when nothing was clipped or the norm is not known (see :func:`clip_gradients`)."""
    if not accelerator.sync_gradients:
        return None
    norm = clip_gradients(accelerator, model, max_grad_norm) if max_grad_norm > 0 else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm
