"""Atomic, resumable checkpoints: ``RUN/checkpoint-{step}`` written via a temporary directory + rename.

A checkpoint holds the trainable weights (the LoRA adapter in peft's format, usable by ``egspo eval
--adapter``, or the full model), the optimizer, the LR scheduler, every process's RNG states and the
trainer state (step, data position), plus the resolved config. Only directories that were renamed
into place count as checkpoints, so a run killed mid-save never leaves a partial "latest" one.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from egspo.config import Config, ConfigError, save_config
from egspo.models.adapter import strip_parallel

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def check_fresh_or_resume(run_dir: str | Path, resume: bool) -> None:
    """Refuse to start a new run over an old run's checkpoints (they would be mixed and pruned)."""
    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise ConfigError(
            f"train.output_dir={str(run_dir)!r} already holds checkpoints (latest: {existing.name}): pass --resume "
            "to continue that run, or choose another train.output_dir."
        )


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in unwrap_named(model) if p.requires_grad}


def unwrap_named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters named as in the peft/transformers model, without DDP/compile prefixes."""
    return list(strip_parallel(model).named_parameters())


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: Config,
    trainer_state: dict[str, Any],
    process_index: int = 0,
    num_processes: int = 1,
    wait: Any = None,
    keep_last: int | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write ``checkpoint-{step}`` atomically. Every process calls it (each saves its RNG state).

    ``wait`` is a barrier callable (``accelerator.wait_for_everyone``) for multi-process runs.
    """
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step}"
    tmp = run_dir / f".tmp-checkpoint-{step}"
    barrier = wait or (lambda: None)
    if process_index == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), tmp / f"rng_state_{process_index}.pt")
    if process_index == 0:
        inner = strip_parallel(model)
        weights_dir = tmp / ("adapter" if hasattr(inner, "peft_config") else "model")
        inner.save_pretrained(weights_dir)
        if tokenizer is not None:  # a checkpoint directory then loads on its own
            tokenizer.save_pretrained(weights_dir)
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step,
                                                            "num_processes": num_processes}, indent=2))
        save_config(config, tmp / "config.yaml")
    barrier()
    if process_index == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        logger.info("Saved checkpoint %s", final)
        if keep_last:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    process_index: int = 0,
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG; return the trainer state."""
    path = Path(path)
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(unwrap_named(model))
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"Checkpoint {path} has weights the model lacks (different LoRA/model setup?): {missing[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng_state_{process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    state = json.loads((path / "trainer_state.json").read_text())
    logger.info("Resumed from %s (step %d)", path, state["step"])
    return state
