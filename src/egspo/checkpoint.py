"""Atomic, resumable checkpoints: ``RUN/checkpoint-{step}`` written via a temporary directory + rename.

A checkpoint holds the trainable weights (the LoRA adapter in peft's format, usable by ``egspo eval
--adapter``, or the full model), the optimizer, the LR scheduler, every process's RNG states and the
trainer state (step, data position), plus the resolved config. Only directories that were renamed
into place count as checkpoints, so a run killed mid-save never leaves a partial "latest" one.

The last file written into a checkpoint is ``manifest.json``: every other file's relative path, size
and SHA-256. A file damaged afterwards (a disk that filled up, a copy cut short, a crash before the
data reached the disk) no longer matches it: :func:`latest_checkpoint` then warns and resumes from the
newest checkpoint that does, and :func:`verify_checkpoint` refuses a named one with the file at fault.

Under sharded training the weights are always written whole (a complete adapter or model that loads
in one process), and every process takes part in gathering them:

- FSDP (1 or 2): torch's ``get_model_state_dict`` / ``get_optimizer_state_dict`` with
  ``full_state_dict=True`` gather the full weights and the full optimizer state (keyed by parameter
  name) to process 0, which writes them; a resume gives each process its shard back
  (``set_*_state_dict``), so it also works with another number of processes.
- DeepSpeed: the full weights come from the engine (ZeRO-3: its 16-bit gather, which needs
  ``zero3_save_16bit_model: true``); the partitioned optimizer state is written by DeepSpeed itself
  (``engine.save_checkpoint`` into ``deepspeed/``, one file per process) and read back by
  ``engine.load_checkpoint``, which needs the same number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from egspo.config import ConfigError, EGSPOConfig, save_config
from egspo.models.adapter import strip_parallel, weights_sharded

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
#: Prefixes that FSDP1 and activation-checkpoint wrappers put in parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
#: The DeepSpeed engine's own checkpoint (partitioned optimizer state) inside a checkpoint directory.
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
#: Written last into every checkpoint: each file's size and SHA-256.
MANIFEST = "manifest.json"
_HASH_CHUNK = 8 * 1024 * 1024  # bytes read at a time: hashing streams, never holds a file in memory


class CheckpointError(ConfigError):
    """A checkpoint directory is incomplete or damaged; the message names the checkpoint and the file."""


def checkpoint_step(name: str) -> int | None:
    """N of a ``checkpoint-N`` directory name; None for any other name."""
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(step, p) for p in run_dir.iterdir() if p.is_dir() and (step := checkpoint_step(p.name)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that matches its manifest; None if the run has no checkpoint.

    Damaged checkpoints are skipped with a warning naming the file at fault; if every checkpoint is
    damaged, :class:`CheckpointError` says so (starting over would silently discard the run).
    """
    ckpts = list_checkpoints(run_dir)
    problems = []
    for ckpt in reversed(ckpts):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as exc:
            logger.warning("%s; skipping it.", exc)
            problems.append(str(exc))
            continue
        if problems:
            logger.warning("Resuming from %s, the newest intact checkpoint of %s.", ckpt.name, run_dir)
        return ckpt
    if problems:
        raise CheckpointError(f"{run_dir} has no intact checkpoint: " + "; ".join(problems)
                              + ". Move the damaged checkpoints away to start the run over.")
    return None


def write_manifest(checkpoint: str | Path) -> Path:
    """Record every file of ``checkpoint`` (relative path, size, SHA-256) in its ``manifest.json``, atomically."""
    checkpoint = Path(checkpoint)
    files = {
        path.relative_to(checkpoint).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and path.name not in (MANIFEST, MANIFEST + ".tmp")
    }
    tmp = checkpoint / (MANIFEST + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump({"version": 1, "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    final = checkpoint / MANIFEST
    os.replace(tmp, final)
    return final


def verify_checkpoint(checkpoint: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the file unless every file in the manifest is there, whole.

    Sizes are checked first (a truncated file is found without reading anything), then checksums.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"{checkpoint} is not a checkpoint directory (it does not exist or is a file)")
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text(encoding="utf-8"))
        files = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {checkpoint} has no {MANIFEST}, so its files cannot be checked (it was written by an "
            "egspo without manifests, or copied partially); if you know it is complete, record it with "
            f"`python -c \"from egspo.checkpoint import write_manifest; write_manifest('{checkpoint}')\"`"
        ) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint} is damaged: {MANIFEST} is unreadable ({exc!r})") from None
    for name, (expected, _) in files.items():
        path = checkpoint / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {checkpoint} is damaged: {name} is missing")
        size = path.stat().st_size
        if size != expected:
            raise CheckpointError(f"checkpoint {checkpoint} is damaged: {name} has {size} bytes where "
                                  f"{expected} were written (truncated or overwritten)")
    for name, (_, sha256) in files.items():
        if _sha256(checkpoint / name) != sha256:
            raise CheckpointError(f"checkpoint {checkpoint} is damaged: the contents of {name} changed since it "
                                  "was written (SHA-256 mismatch)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(_HASH_CHUNK))
    with path.open("rb", buffering=0) as handle:
        while read := handle.readinto(buffer):
            digest.update(buffer[:read])
    return digest.hexdigest()


def check_fresh_or_resume(run_dir: str | Path, resume: bool) -> None:
    """Refuse to start a new run over an old run's checkpoints (they would be mixed and pruned)."""
    ckpts = list_checkpoints(run_dir)  # damaged ones count too: they would be overwritten
    existing = ckpts[-1] if ckpts else None
    if existing is not None and not resume:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} already holds checkpoints (latest: {existing.name}): pass --resume "
            "(resume_from_checkpoint=True) to continue that run, or choose another output_dir."
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
    """Parameters named as in the peft/transformers model, without DDP/FSDP/compile prefixes."""
    return [(_clean_name(n), p) for n, p in strip_parallel(model).named_parameters()]


def _clean_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def is_deepspeed(model: nn.Module) -> bool:
    """A DeepSpeed engine (what ``accelerator.prepare`` returns under DeepSpeed)."""
    return (callable(getattr(model, "zero_optimization_stage", None))
            and callable(getattr(model, "save_checkpoint", None)))


def _base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def gather_full_weights(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a sharded model, on CPU on process 0 (empty elsewhere); None if unsharded.

    Every process must call it under FSDP and ZeRO-3 (it is a collective).
    """
    if is_deepspeed(model):
        engine: Any = model  # a DeepSpeed engine, whose methods nn.Module does not declare
        if engine.zero_optimization_stage() == 3:
            if not engine.zero_gather_16bit_weights_on_model_save():
                raise ConfigError(
                    "DeepSpeed ZeRO-3 checkpoints need the full weights gathered: set zero3_save_16bit_model: true "
                    "(stage3_gather_16bit_weights_on_model_save) in the accelerate/DeepSpeed config."
                )
            state = engine._zero3_consolidated_16bit_state_dict() or {}
        else:
            state = strip_parallel(model).state_dict()
    elif weights_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        return None
    return {_clean_name(k): v.detach().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: EGSPOConfig,
    trainer_state: dict[str, Any],
    process_index: int = 0,
    num_processes: int = 1,
    wait: Any = None,
    keep_last: int | None = None,
    tokenizer: Any = None,
    protect: Path | None = None,
) -> Path:
    """Write ``checkpoint-{step}`` atomically. Every process calls it (each saves its RNG state).

    ``keep_last`` prunes older checkpoints, never ``protect`` (the best one of ``load_best_model_at_end``).
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
    full = gather_full_weights(model)  # collective under FSDP / ZeRO-3
    optimizer_state = None
    if is_deepspeed(model):  # every process writes its optimizer partition
        engine: Any = model  # a DeepSpeed engine
        # the frozen base weights are not state to resume (they are in the model's own files)
        engine.save_checkpoint(str(tmp / DEEPSPEED_DIR), tag=DEEPSPEED_TAG, save_latest=False,
                               exclude_frozen_parameters=True)
    elif full is not None:  # FSDP: the full optimizer state, keyed by parameter name (collective)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        optimizer_state = get_optimizer_state_dict(
            model, _base_optimizer(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if process_index == 0:
        inner: Any = strip_parallel(model)  # a transformers or peft model: save_pretrained
        weights_dir = tmp / ("adapter" if hasattr(inner, "peft_config") else "model")
        if full is None:
            inner.save_pretrained(weights_dir)
            save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        else:
            trainable = [n for n, p in unwrap_named(model) if p.requires_grad]
            save_file({n: full[n] for n in trainable}, str(tmp / "trainable.safetensors"))
            inner.save_pretrained(weights_dir, state_dict=dict(full))  # transformers empties the dict it gets
        if tokenizer is not None:  # a checkpoint directory then loads on its own
            tokenizer.save_pretrained(weights_dir)
        if not is_deepspeed(model):
            torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step,
                                                            "num_processes": num_processes}, indent=2))
        save_config(config, tmp / "config.yaml")
    barrier()
    if process_index == 0:
        write_manifest(tmp)  # last: every process's files are in place
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        logger.info("Saved checkpoint %s", final)
        if keep_last:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                if protect is None or old.resolve() != Path(protect).resolve():
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
        raise ConfigError(f"Checkpoint {path} has weights the model lacks, e.g. {missing[:3]}: it was trained with "
                          "another base model or LoRA setup; resume with the run's own config.yaml.")
    if is_deepspeed(model):
        _load_deepspeed(path, model)
    elif weights_sharded(model):
        _load_fsdp(path, model, optimizer, weights)
    else:
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        if _keyed_by_name(state):
            raise ConfigError(f"{path} was written by an FSDP run; resume it under FSDP (its optimizer state is keyed "
                              "by parameter name).")
        optimizer.load_state_dict(state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng_state_{process_index}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    state = json.loads((path / "trainer_state.json").read_text())
    logger.info("Resumed from %s (step %d)", path, state["step"])
    return state


def _keyed_by_name(optimizer_state: dict[str, Any]) -> bool:
    groups = optimizer_state.get("param_groups") or [{}]
    return any(isinstance(p, str) for p in groups[0].get("params", []))


def _load_fsdp(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor]
) -> None:
    """Give every FSDP process its shard of the checkpoint's full weights and optimizer state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    if not _keyed_by_name(state):
        raise ConfigError(f"{path} was written by a DDP or single-process run; its optimizer state cannot be "
                          "resumed under FSDP. Resume it without FSDP.")
    options = StateDictOptions(full_state_dict=True, strict=False)
    # torch declares a dict of its union of tensor kinds, and dict is invariant; plain tensors are one kind
    set_model_state_dict(model, cast("dict[str, Any]", weights), options=options)
    set_optimizer_state_dict(model, _base_optimizer(optimizer), state, options=options)


def _load_deepspeed(path: Path, engine: Any) -> None:
    """Weights and the partitioned optimizer state from DeepSpeed's own checkpoint (same process count)."""
    ds_dir = path / DEEPSPEED_DIR
    if not ds_dir.is_dir():
        raise ConfigError(f"{path} has no {DEEPSPEED_DIR}/ (written without DeepSpeed); resume it without DeepSpeed.")
    loaded, _ = engine.load_checkpoint(str(ds_dir), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False, load_module_strict=False)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load {ds_dir} (tag {DEEPSPEED_TAG!r}).")
