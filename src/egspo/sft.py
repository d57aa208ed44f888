"""Completion-only masked-diffusion SFT (as in LLaDA and d1).

For each example, draw t ~ U(eps, 1], mask every completion token independently with probability t
(the prompt is never masked), and minimise the cross-entropy on the masked tokens weighted by 1/t,
normalised by the completion length. Completions are padded with the end token up to
``max_completion_length`` so that the model learns to fill the rest of a fixed-length completion with
end tokens, which is what the sampler asks of it.

    egspo sft --config configs/sft_sudoku_tiny.yaml

Data: a task's training rows (with the task's reference completion), or a user's jsonl whose rows
carry ``prompt`` and ``completion`` strings.

The run's life cycle is RL's (:mod:`egspo.run_lifecycle`): the launch check, a fresh start refused
over an old run's checkpoints, ``--resume`` from the newest intact checkpoint (a warning and a fresh
start when there is none), config.yaml and metrics.jsonl, checkpoints every ``save_steps`` and at the
end, SIGINT/SIGTERM finishing the step, saving a checkpoint and raising
:class:`~egspo.run_lifecycle.TrainingInterrupted` (``egspo sft`` exits 130/143), and a failed start
removing the directory it created. The examples and masks of a step depend only on (seed, step), so
a resumed run equals the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from egspo.config import ConfigError, EGSPOConfig
from egspo.models.adapter import DiffusionLM
from egspo.models.loading import load_model
from egspo.models.lora import prepare_for_training
from egspo.rl.batching import encode_prompts
from egspo.rl.data import prompt_text
from egspo.run_lifecycle import RunLifecycle, StopFlag, TrainingInterrupted
from egspo.run_setup import make_accelerator, make_optimizer, optimizer_step, prepare_model_and_optimizer
from egspo.seeding import stream
from egspo.tasks import get_task

logger = logging.getLogger(__name__)

#: Smallest masking probability (avoids dividing by ~0).
MIN_MASK_PROB = 1e-3


def sft_pairs(cfg: EGSPOConfig, tokenizer: Any) -> list[tuple[str, str]]:
    """(prompt text, completion text) pairs from the configured data."""
    task = get_task(cfg.task)
    rows = task.load(cfg.train_file, "train", cfg.num_train, cfg.seed, **cfg.task_options)
    pairs = []
    for i, row in enumerate(rows):
        if "prompt" in row and "completion" in row:  # the prompt as in RL: text as it is, messages templated
            pairs.append((prompt_text(tokenizer, row, task), str(row["completion"])))
            continue
        completion = task.reference_completion(row)
        if completion is None:
            raise ConfigError(
                f"SFT row {i} of task {cfg.task!r} has no 'completion' field and the task has no reference "
                "completion for it (no solution field, or for countdown no solution exists): fix or drop the row, "
                "or give a jsonl of prompt/completion pairs in train_file."
            )
        pairs.append((prompt_text(tokenizer, row, task), completion))
    return pairs


def encode_completions(tokenizer: Any, texts: list[str], length: int, eos_id: int) -> torch.Tensor:
    """(B, length) completion ids, each ended by and filled with ``eos_id``; too long ones are cut."""
    out = torch.full((len(texts), length), eos_id, dtype=torch.long)
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    too_long = 0
    for i, ids in enumerate(encoded):
        ids = ids[:length]
        too_long += len(ids) == length
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    if too_long:
        logger.warning("%d completion(s) fill all %d positions and have no end token; raise max_completion_length.",
                       too_long, length)
    return out


@dataclasses.dataclass(frozen=True)
class SFTData:
    """Every SFT example tokenized once: left-padded prompts and end-padded completions (CPU tensors)."""

    prompt_ids: torch.Tensor  # (N, W) left-padded to the longest prompt
    prompt_mask: torch.Tensor  # (N, W) 1 on prompt tokens
    prompt_lengths: torch.Tensor  # (N,)
    completions: torch.Tensor  # (N, gen_length)

    @classmethod
    def encode(cls, tokenizer: Any, pairs: list[tuple[str, str]], max_prompt_length: int, gen_length: int,
               eos_id: int) -> SFTData:
        ids, mask = encode_prompts(tokenizer, [p for p, _ in pairs], max_prompt_length, torch.device("cpu"))
        completions = encode_completions(tokenizer, [c for _, c in pairs], gen_length, eos_id)
        return cls(ids, mask, mask.sum(1), completions)

    def __len__(self) -> int:
        return self.completions.shape[0]

    def batch(self, picks: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt ids, prompt mask, completion ids) of ``picks``, prompts left-padded to the batch's longest."""
        width = int(self.prompt_lengths[picks].max())
        start = self.prompt_ids.shape[1] - width
        return (self.prompt_ids[picks, start:].to(device), self.prompt_mask[picks, start:].to(device),
                self.completions[picks].to(device))


def masked_diffusion_loss(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, mask_prob: torch.Tensor
) -> torch.Tensor:
    """Σ over masked positions of CE / t, divided by the completion length, mean over the batch."""
    ce = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    weighted = torch.where(masked, ce, torch.zeros_like(ce)) / mask_prob.unsqueeze(1)
    return (weighted.sum(1) / targets.shape[1]).mean()


def sft(cfg: EGSPOConfig, resume: bool | str | Path = False) -> Path:
    """Run masked-diffusion SFT; returns the run directory (final weights in its last checkpoint).

    ``resume`` True continues from the newest intact checkpoint of output_dir (from scratch, with a
    warning, when there is none), a checkpoint directory from that one. SIGINT/SIGTERM save a
    checkpoint after the current step and raise :class:`TrainingInterrupted`. A run that fails before
    its first checkpoint removes the output directory it created.
    """
    acc = make_accelerator(cfg)
    run = RunLifecycle(cfg, acc)
    with run.opened(resume) as ckpt:
        set_seed(cfg.seed)
        dlm, tokenizer = load_model(cfg.model_config(), device=acc.device)
        dlm = prepare_for_training(dlm, cfg.model_config(), need_reference=False)
        pairs = sft_pairs(cfg, tokenizer)
        data = SFTData.encode(tokenizer, pairs, cfg.max_prompt_length, cfg.max_completion_length, dlm.eos_id)
        params = [p for p in dlm.model.parameters() if p.requires_grad]
        optimizer, scheduler = make_optimizer(params, cfg, cfg.max_steps)
        model, optimizer = prepare_model_and_optimizer(acc, dlm.model, optimizer, cfg)
        start = 0
        if ckpt is not None:
            start = run.load(ckpt, model=model, optimizer=optimizer, scheduler=scheduler)["step"]
        if not run.finished(start):
            _train(run, dataclasses.replace(dlm, model=model), optimizer, scheduler, tokenizer, data, start)
    return run.run_dir


def _train(run: RunLifecycle, dlm: DiffusionLM, optimizer: Any, scheduler: Any, tokenizer: Any, data: SFTData,
           start: int) -> None:
    """Steps ``start`` to ``max_steps`` of the prepared ``dlm.model``: log, save, stop on a signal."""
    cfg, acc, model = run.cfg, run.accelerator, dlm.model
    metrics = run.begin(start)
    batch = cfg.per_device_train_batch_size
    global_batch = batch * acc.num_processes
    gen_len = cfg.max_completion_length
    bar = tqdm(total=cfg.max_steps, initial=start, desc="egspo sft", disable=not acc.is_main_process)
    model.train()
    with StopFlag() as stop:
        for step in range(start, cfg.max_steps):
            total = 0.0
            for micro in range(cfg.gradient_accumulation_steps):
                # examples and masks of (step, micro) depend only on the seed: resume repeats them exactly
                index = (step * cfg.gradient_accumulation_steps + micro) * global_batch
                gen = stream("sft_noise", cfg.seed, index)
                epoch = index // len(data)
                order = torch.randperm(len(data), generator=stream("sft_order", cfg.seed, epoch))
                picks = order[(index + acc.process_index * batch + torch.arange(batch)) % len(data)]
                ids, mask, targets = data.batch(picks, acc.device)
                t = torch.rand(batch, generator=gen) * (1 - MIN_MASK_PROB) + MIN_MASK_PROB
                masked = (torch.rand(batch, gen_len, generator=gen) < t.unsqueeze(1)).to(acc.device)
                noisy = torch.where(masked, torch.full_like(targets, dlm.mask_id), targets)
                inputs = torch.cat([ids, noisy], dim=1)
                attention = torch.cat([mask, torch.ones_like(noisy)], dim=1)
                positions = torch.arange(ids.shape[1], inputs.shape[1], device=acc.device)
                with acc.accumulate(model), acc.autocast():
                    logits = dlm.logits(inputs, attention, positions)
                    loss = masked_diffusion_loss(logits, targets, masked, t.to(acc.device))
                    acc.backward(loss)
                    optimizer_step(acc, model, optimizer, scheduler, cfg.max_grad_norm)
                total += float(loss.detach())
            avg = float(acc.reduce(torch.tensor(total / cfg.gradient_accumulation_steps, device=acc.device),
                                   reduction="mean"))
            done = step + 1
            if done % cfg.logging_steps == 0 or done == cfg.max_steps:
                metrics.write({"step": done, "loss": avg, "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            bar.set_postfix(loss=f"{avg:.4f}")
            signum = stop.agreed(acc)  # every process stops at the same step
            if run.checkpoint_due(done, bool(signum)):
                run.save(done, model=model, optimizer=optimizer, scheduler=scheduler, tokenizer=tokenizer,
                         trainer_state={"examples_seen": done * cfg.gradient_accumulation_steps * global_batch})
            if math.isnan(avg):
                raise RuntimeError(f"SFT loss became NaN at step {done}; lower learning_rate.")
            if signum:
                bar.close()
                raise TrainingInterrupted(signum, done, run.run_dir)
    bar.close()
