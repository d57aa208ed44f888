"""Advantages over the global batch of a multi-process RL step: gather, compute, take this process's rows.

The global batch of one RL step is ordered by process: process ``p`` holds rows ``[p*B, (p+1)*B)`` and
the G rollouts of a prompt are consecutive rows, so a group may span processes (8 GPUs x 6 rollouts
with G = 8). Group baselines therefore need every process's rewards: each process gathers them, computes
the advantages of the whole batch (cheap: B*K floats) and keeps its own slice. Every process gets the
same numbers, whatever the launch size, as long as the global batch is the same.

``gather`` is any function that concatenates a tensor's rows over processes in process order and
takes the tensors where they are (CPU here): the trainer's ``EGSPOTrainer._gather`` (moves them to the
accelerator's device for NCCL, gathers, returns them on CPU), or the identity in one process. So the
functions run and test without a launcher:

    adv = global_stepwise_advantages(rewards, greedy, weights, self.args, gather=self._gather,
                                     process_index=acc.process_index)
    adv.local      # (B, K) advantages of this process's rows
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from egspo.config import ConfigError, EGSPOConfig
from egspo.rl.advantages import group_advantages, stepwise_advantages

Gather = Callable[[torch.Tensor], torch.Tensor]


def check_launch(num_processes: int) -> None:
    """Refuse a launch where the launcher started more processes than accelerate joined.

    On a machine without CUDA, processes started by torchrun (or ``accelerate launch --multi_gpu``)
    each set up a *single-process* accelerator unless ``ACCELERATE_USE_CPU=1`` is set: every one of them
    would train alone on the same run directory. Call after creating the Accelerator.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world != num_processes:
        raise ConfigError(
            f"The launcher started {world} processes (WORLD_SIZE) but accelerate runs {num_processes}: without "
            "GPUs, set ACCELERATE_USE_CPU=1 for a multi-process CPU run (gloo), or launch a single process."
        )


def local_rows(x: torch.Tensor, process_index: int, rows_per_process: int) -> torch.Tensor:
    """This process's rows ``[p*B, (p+1)*B)`` of a gathered tensor."""
    if x.shape[0] < (process_index + 1) * rows_per_process:
        raise ValueError(
            f"A gathered batch of {x.shape[0]} rows has no rows for process {process_index} "
            f"({rows_per_process} per process)."
        )
    return x[process_index * rows_per_process : (process_index + 1) * rows_per_process]


def agreed_max(value: int, gather: Gather) -> int:
    """The largest ``value`` over processes (adaptive K: every process must run the same updates)."""
    return int(gather(torch.tensor([value])).max())


@dataclass
class GlobalAdvantages:
    """Advantages of this process's rows, plus the gathered inputs (for metrics)."""

    local: torch.Tensor  # (B, K) or (B,): this process's rows
    rewards: torch.Tensor  # (N,) final rewards of the global batch, N = B x processes
    greedy: torch.Tensor | None = None  # (N, K) greedy-completion rewards (None for diffu-GRPO)
    weights: torch.Tensor | None = None  # (N, K) selection weights, 0 = padded slot


def global_stepwise_advantages(
    local_rewards: torch.Tensor,
    local_greedy: torch.Tensor | None,
    local_weights: torch.Tensor,
    rl: EGSPOConfig,
    *,
    gather: Gather,
    process_index: int,
) -> GlobalAdvantages:
    """EGSPO / EGSPO-SA advantages (docs/algorithm.md#stepwise-advantages) of this process's rows, with group
    baselines over all processes.

    ``local_rewards`` (B,), ``local_greedy`` (B, K) rewards of the one-step greedy completions (None when
    λ = 0: the step term vanishes and r̂ is never scored), ``local_weights`` (B, K) selection weights.
    Options (λ, normalisation, centering, std scaling, G) come from ``rl``.
    """
    b, k = local_weights.shape
    if local_rewards.shape != (b,):
        raise ValueError(f"local_rewards must be ({b},) like local_weights' rows, got {tuple(local_rewards.shape)}.")
    lam = float(rl.stepwise_lambda or 0.0)
    if local_greedy is None:
        if lam > 0:
            raise ValueError(f"stepwise_lambda={lam} needs the greedy-completion rewards (local_greedy).")
        local_greedy = local_rewards.float().unsqueeze(1).expand(b, k)
    all_rewards = gather(local_rewards.float().contiguous())
    all_greedy = gather(local_greedy.float().contiguous())
    all_weights = gather(local_weights.float().contiguous())
    advantages = stepwise_advantages(
        all_rewards, all_greedy, rl.num_generations, lam,
        normalize_returns=rl.normalize_returns, center_step_term=rl.center_step_term,
        scale_rewards=rl.scale_rewards, weights=all_weights,
    )
    return GlobalAdvantages(local=local_rows(advantages, process_index, b), rewards=all_rewards,
                            greedy=all_greedy, weights=all_weights)


def global_group_advantages(
    local_rewards: torch.Tensor, rl: EGSPOConfig, *, gather: Gather, process_index: int
) -> GlobalAdvantages:
    """diffu-GRPO advantages ``r - mean_group(r)`` (docs/algorithm.md#diffu-grpo) of this process's rows, groups
    over all processes."""
    all_rewards = gather(local_rewards.float().contiguous())
    advantages = group_advantages(all_rewards, rl.num_generations, scale=rl.scale_rewards)
    return GlobalAdvantages(local=local_rows(advantages, process_index, local_rewards.shape[0]), rewards=all_rewards)


def leave_gloo_group() -> None:
    """End a multi-process CPU (gloo) run's process now, once its work is on disk.

    gloo's teardown is unreliable on CPU: ``destroy_process_group`` can block one rank forever, and
    leaving the group alive can abort at interpreter exit. The command line calls this after a run
    has saved everything; it does nothing outside a gloo process group.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_backend() != "gloo":
        return
    torch.distributed.barrier()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
