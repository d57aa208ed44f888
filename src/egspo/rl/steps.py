"""The algorithm half of :class:`~egspo.rl.trainer.EGSPOTrainer`: one training step.

EGSPO / EGSPO-SA: a rollout batch, its rewards, K selected steps per rollout, stepwise advantages and K
micro-batch updates (docs/algorithm.md#egspo-loss); with an approximate (KV-cached) rollout, the exact
old log-probs, greedy completions and truncated importance weights first
(docs/algorithm.md#approximate-rollouts). diffu-GRPO: d1's generation cycle of
``gradient_accumulation_steps`` rollout batches and ``num_iterations`` optimizer steps
(docs/algorithm.md#diffu-grpo). The trainer supplies the state (model, optimizer, data, scorer) and the
run's life cycle around these steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, cast

import torch
from accelerate import Accelerator

from egspo.config import EGSPOConfig
from egspo.models.adapter import DiffusionLM
from egspo.rl.advantages import zero_variance_groups
from egspo.rl.batching import PromptStream, encode_prompts
from egspo.rl.data import prompt_text, reward_prompt
from egspo.rl.distributed import agreed_max, global_group_advantages, global_stepwise_advantages
from egspo.rl.estimators import action_logps, exact_step_outputs, masked_completion_logps
from egspo.rl.losses import completion_token_mask, diffu_grpo_loss, egspo_step_loss, kl_exact
from egspo.rl.metrics import step_histogram
from egspo.rl.rewards import RewardScorer
from egspo.rl.selection import SelectedSteps, select_steps
from egspo.rl.tracking import sample_rows
from egspo.run_setup import optimizer_step
from egspo.sampling import rollout_module, sample
from egspo.seeding import stream
from egspo.tasks import Task
from egspo.trajectory import Trajectory


@dataclass
class _Batch:
    rows: list[dict[str, Any]]
    prompts: list[Any]
    traj: Trajectory
    completions: list[str]


class RLSteps:
    """One training step of EGSPO / EGSPO-SA or diffu-GRPO, on the state that the trainer sets up."""

    args: EGSPOConfig
    accelerator: Accelerator
    dlm: DiffusionLM
    processing_class: Any
    task: Task | None
    scorer: RewardScorer
    stream: PromptStream
    sampler_cfg: Any
    optimizer: Any
    scheduler: Any
    conversational: bool
    _samples: list[list[Any]]

    def _completion_ids(self, completions: torch.Tensor) -> list[list[int]]:
        """Each row's completion tokens up to its first end token (what TRL's ``completion_ids`` holds)."""
        mask = completion_token_mask(completions, self.dlm.stop_ids)
        lengths = mask.sum(1).tolist()
        return [row[:n] for row, n in zip(completions.tolist(), lengths, strict=True)]

    # -- one step ---------------------------------------------------------------------------------

    def _rollout(self, step: int) -> _Batch:
        cfg, acc = self.args, self.accelerator
        group_rows = self.stream.batch(step)
        rows_global = [row for row in group_rows for _ in range(cfg.num_generations)]
        b = cfg.per_device_train_batch_size
        rows = rows_global[acc.process_index * b : (acc.process_index + 1) * b]
        prompts = [prompt_text(self.processing_class, row, self.task) for row in rows]
        ids, mask = encode_prompts(self.processing_class, prompts, cfg.max_prompt_length, acc.device)
        generator = stream("rollout", cfg.seed, step, acc.process_index, device=acc.device)
        with acc.autocast():
            traj = sample(self.dlm, ids, self.sampler_cfg, attention_mask=mask, generator=generator,
                          # a cached rollout's greedy completions are recomputed exactly (_exact_step_outputs)
                          record_greedy=cfg.algorithm != "diffu_grpo" and bool(cfg.stepwise_lambda)
                          and cfg.rollout_cache == "none")
        completions = self.processing_class.batch_decode(traj.completions, skip_special_tokens=True)
        return _Batch(rows=rows, prompts=[reward_prompt(row, text) for row, text in zip(rows, prompts, strict=True)],
                      traj=traj, completions=completions)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(x.to(self.accelerator.device).contiguous()).cpu()

    def _agreed_k(self, k: int) -> int:
        return agreed_max(k, self._gather)

    def _rollout_and_score(self, index: int, timings: dict[str, float]) -> tuple[_Batch, torch.Tensor, dict[str, Any]]:
        """Rollout batch ``index`` of the run, its rewards (this process's rows) and the batch metrics."""
        cfg = self.args
        t0 = time.perf_counter()
        batch = self._rollout(index)
        timings["time/rollout"] = timings.get("time/rollout", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        rewards, per_fn = self.scorer.score(batch.prompts, batch.completions, batch.rows,
                                            completion_ids=self._completion_ids(batch.traj.completions),
                                            conversational=self.conversational)
        all_rewards = self._gather(rewards)
        metrics: dict[str, Any] = {
            "reward/mean": float(all_rewards.mean()),
            "reward/std": float(all_rewards.std()) if all_rewards.numel() > 1 else 0.0,
            "zero_variance_groups": zero_variance_groups(all_rewards, cfg.num_generations),
        }
        all_fn = self._gather(per_fn)
        for j, name in enumerate(self.scorer.names):
            col = all_fn[:, j]
            metrics[f"reward/{name}/mean"] = float(col.nanmean()) if (~col.isnan()).any() else float("nan")
            metrics[f"reward/{name}/std"] = float(col[~col.isnan()].std()) if (~col.isnan()).sum() > 1 else 0.0
        accuracy = self.task.metrics(batch.completions, batch.rows)["accuracy"] if self.task is not None else math.nan
        if not math.isnan(accuracy):  # the custom task has no accuracy protocol
            metrics["accuracy"] = float(self._gather(torch.tensor([accuracy])).mean())
        metrics["completion_tokens"] = float(self._gather(
            completion_token_mask(batch.traj.completions, self.dlm.stop_ids).sum(1).float()).mean())
        timings["time/score"] = timings.get("time/score", 0.0) + time.perf_counter() - t0
        self._samples = sample_rows([str(p) for p in batch.prompts], batch.completions, rewards.tolist())
        return batch, rewards, metrics

    def step(self, step: int) -> dict[str, Any]:
        """One training step: a rollout batch and its K micro-batch updates (EGSPO), or d1's generation
        cycle (diffu-GRPO: ``gradient_accumulation_steps`` rollout batches, ``num_iterations`` optimizer steps)."""
        if self.args.algorithm == "diffu_grpo":
            return self._diffu_grpo_step(step)
        cfg = self.args
        timings: dict[str, float] = {}
        batch, rewards, metrics = self._rollout_and_score(step, timings)
        t0 = time.perf_counter()
        selected = self._select(batch.traj, step)
        timings["time/score"] += time.perf_counter() - t0
        old_logps = greedy = is_weights = None
        if cfg.rollout_cache != "none":  # an approximate rollout: exact log-probs and greedy completions
            t0 = time.perf_counter()
            old_logps, greedy, is_weights, mismatch = self._exact_step_outputs(batch.traj, selected)
            metrics.update(mismatch)
            timings["time/old_logps"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        adv, score_metrics = self._egspo_advantages(batch, selected, rewards, greedy)
        metrics.update(score_metrics)
        timings["time/score"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics.update(self._update_egspo(batch, selected, adv, old_logps, is_weights))
        timings["time/update"] = time.perf_counter() - t0
        return self._step_metrics(metrics, timings, [batch])

    def _step_metrics(
        self, metrics: dict[str, Any], timings: dict[str, float], batches: list[_Batch]
    ) -> dict[str, Any]:
        metrics.update(timings)
        total_tokens = float(self._gather(torch.tensor([sum(b.traj.sequences.numel() for b in batches)])).sum())
        metrics["tokens_per_second"] = total_tokens / max(sum(timings.values()), 1e-9)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if self.accelerator.device.type == "cuda":  # this process's peak so far
            metrics["memory/peak_gb"] = torch.cuda.max_memory_allocated(self.accelerator.device) / 2**30
        return metrics

    # -- EGSPO / EGSPO-SA ---------------------------------------------------------------------------

    def _select(self, traj: Trajectory, step: int) -> SelectedSteps:
        cfg = self.args
        generator = stream("selection", cfg.seed, step, self.accelerator.process_index, device=traj.step_entropy.device)
        return select_steps(
            traj.step_entropy, cast(int, cfg.num_selected_steps), cfg.step_selection,  # set in __post_init__
            valid_steps=traj.valid_steps, last_content_step=traj.last_content_step,
            stop_at_last_content=cfg.stop_at_last_content, alpha=cfg.adaptive_alpha,
            generator=generator, k_max_reduce=self._agreed_k, as_published=cfg.step_selection_as_published,
        )

    def _egspo_advantages(
        self, batch: _Batch, selected: SelectedSteps, rewards: torch.Tensor, greedy: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Stepwise advantages (B, K) and the selection's metrics; ``greedy`` (B, K, L_c) replaces the sampler's
        recorded greedy completions (the exact ones of an approximate rollout)."""
        cfg, acc = self.args, self.accelerator
        greedy_rewards = self._greedy_rewards(batch, selected, greedy) if cfg.stepwise_lambda else None
        result = global_stepwise_advantages(rewards, greedy_rewards, selected.weights.float(), cfg,
                                            gather=self._gather, process_index=acc.process_index)
        # global_stepwise_advantages always gathers the greedy rewards and the weights (None: diffu-GRPO only)
        all_greedy, all_weights = cast(torch.Tensor, result.greedy), cast(torch.Tensor, result.weights)
        metrics = self._selection_metrics(batch.traj, selected, all_weights)
        if greedy_rewards is not None:
            metrics["reward/greedy_mean"] = float(all_greedy.mean())
        return result.local.to(acc.device), metrics

    def _greedy_rewards(self, batch: _Batch, selected: SelectedSteps, greedy: torch.Tensor | None) -> torch.Tensor:
        """(B, K) rewards of the one-step greedy completions of the selected steps (the step rewards)."""
        k = selected.steps.shape[1]
        if greedy is None:
            greedy = batch.traj.greedy_completions(selected.steps)  # (B, K, L_c)
        greedy = greedy.cpu()
        texts = self.processing_class.batch_decode(greedy.flatten(0, 1), skip_special_tokens=True)
        rows = [row for row in batch.rows for _ in range(k)]
        prompts = [p for p in batch.prompts for _ in range(k)]
        greedy_rewards, _ = self.scorer.score(
            prompts, texts, rows, completion_ids=self._completion_ids(greedy.flatten(0, 1)),
            conversational=self.conversational, correctness_only=self.args.step_reward_correctness_only)
        return greedy_rewards.view(-1, k)

    def _selection_metrics(self, traj: Trajectory, selected: SelectedSteps, all_weights: torch.Tensor
                           ) -> dict[str, Any]:
        """Entropy of the selected and of all steps, which steps were chosen, selections per rollout (global)."""
        ent = traj.step_entropy
        valid = traj.valid_steps
        sel_ent = ent.gather(1, selected.steps.to(ent.device))
        w = selected.weights.to(ent.device)
        return {
            "entropy/selected": float(self._gather(((sel_ent * w).sum() / w.sum().clamp_min(1)).view(1)).mean()),
            "entropy/all": float(self._gather(((ent * valid).sum() / valid.sum().clamp_min(1)).view(1)).mean()),
            "selected_steps_histogram": step_histogram(
                self._gather(selected.steps), self._gather(selected.weights), traj.num_steps),
            "selected_per_rollout": float(all_weights.sum(1).mean()),
        }

    @torch.no_grad()
    def _exact_step_outputs(
        self, traj: Trajectory, selected: SelectedSteps
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """The correction of an approximate (KV-cached) rollout (docs/algorithm.md#approximate-rollouts).

        One exact forward per selected-step slot, batched over the rows, before any update of this batch
        (the model is still the rollout's policy: the merged LoRA copy when the rollout ran on it, compiled
        when the rollout is) and in eval mode as the rollout ran, gives: the exact
        step log-probs (B, K), which replace the recorded approximate ones in the ratio; the exact greedy
        completions (B, K, L_c), which give the step rewards; and the truncated importance weights
        min(exp(exact - approximate), importance_weight_cap) (B, K), None when the cap is 0. Also the
        mismatch metrics: mean |log-ratio|, mean and max log-ratio, share of capped weights.
        """
        acc, cap = self.accelerator, self.args.importance_weight_cap
        traj = traj.to(acc.device)
        steps = selected.steps.to(acc.device)
        # the policy the rollout ran (a LoRA model's merged copy, compiled if the rollout is), without the cache
        rollout_dlm = self.dlm.for_rollout(self.sampler_cfg.merge_lora)
        model = rollout_module(rollout_dlm, self.sampler_cfg)
        with rollout_dlm.evaluating(), acc.autocast():
            outputs = [exact_step_outputs(rollout_dlm, traj, steps[:, k], model=model) for k in range(steps.shape[1])]
        exact = torch.stack([logp.float() for logp, _ in outputs], dim=1)
        greedy = torch.stack([tokens for _, tokens in outputs], dim=1)
        log_ratio = exact - traj.step_logps.gather(1, steps).float()
        weights = selected.weights.to(acc.device).float()
        is_weights = log_ratio.exp().clamp(max=cap) if cap > 0 else None
        capped = (log_ratio.exp() > cap).float() if cap > 0 else torch.zeros_like(log_ratio)
        local = torch.stack([(log_ratio.abs() * weights).sum(), (log_ratio * weights).sum(), (capped * weights).sum(),
                             weights.sum()]).view(1, 4)
        totals = self._gather(local).sum(0)
        real = log_ratio.masked_fill(weights == 0, float("-inf")).max().view(1)
        n = totals[3].clamp_min(1)
        mismatch = {"approx/old_logp_gap": float(totals[0] / n), "approx/log_ratio_mean": float(totals[1] / n),
                    "approx/log_ratio_max": float(self._gather(real).max()),
                    "approx/capped_fraction": float(totals[2] / n)}
        return exact, greedy, is_weights, mismatch

    def _update_egspo(
        self, batch: _Batch, selected: SelectedSteps, adv: torch.Tensor, old_logps: torch.Tensor | None = None,
        is_weights: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """K micro-batch updates; ``old_logps`` (B, K) replaces the sampler's recorded step log-probs and
        ``is_weights`` (B, K) multiply the steps' losses (the correction of an approximate, cached rollout)."""
        cfg, acc = self.args, self.accelerator
        traj = batch.traj.to(acc.device)
        steps_all = selected.steps.to(acc.device)
        weights_all = selected.weights.to(acc.device)
        if is_weights is not None:  # padding keeps weight 0
            weights_all = weights_all * is_weights.to(weights_all.dtype)
        per_mb = cfg.steps_per_microbatch
        # An adaptive K need not fill whole optimizer steps: pad with zero-weight slots so that the last
        # optimizer step of this batch is complete and no gradient carries over into the next batch.
        group = per_mb * cfg.gradient_accumulation_steps
        pad = -steps_all.shape[1] % group
        if pad:
            steps_all = torch.cat([steps_all, steps_all[:, -1:].expand(-1, pad)], dim=1)
            weights_all = torch.cat([weights_all, weights_all.new_zeros(weights_all.shape[0], pad)], dim=1)
            adv = torch.cat([adv, adv.new_zeros(adv.shape[0], pad)], dim=1)
            if old_logps is not None:
                old_logps = torch.cat([old_logps, old_logps[:, -1:].expand(-1, pad)], dim=1)
        exact = cfg.kl_estimator == "exact"
        agg = cfg.logp_aggregation
        sums: dict[str, float] = {}
        n_mb = 0
        self.dlm.model.train()
        for start in range(0, steps_all.shape[1], per_mb):
            cols = slice(start, start + per_mb)
            # fold the slots of this micro-batch into the batch dimension: one forward for all of them
            steps = steps_all[:, cols].T.reshape(-1)
            rows = torch.arange(traj.batch_size, device=acc.device).repeat(steps_all[:, cols].shape[1])
            sub = traj if per_mb == 1 else traj.select_rows(rows)
            weights = weights_all[:, cols].T.reshape(-1)
            advantages = adv[:, cols].T.reshape(-1)
            if old_logps is None:
                old = sub.step_logps.gather(1, steps.unsqueeze(1)).squeeze(1)
            else:
                old = old_logps[:, cols].T.reshape(-1)
            ntok = sub.tokens_per_step.gather(1, steps.unsqueeze(1)).squeeze(1)
            if cfg.logp_aggregation == "mean":
                old = old / ntok.clamp_min(1)
            ref_logp, ref_logits = None, None
            if cfg.beta > 0:
                with torch.no_grad(), self.dlm.reference_model() as ref, acc.autocast():
                    ref_logp, _, _, ref_logits = action_logps(self.dlm, sub, steps, aggregation=agg, model=ref,
                                                              with_logits=exact)
            with acc.accumulate(self.dlm.model), acc.autocast():
                logp, num_tokens, valid, logits = action_logps(self.dlm, sub, steps, aggregation=agg, with_logits=exact)
                # the logits are returned (not None) exactly when exact
                kl = kl_exact(logits, ref_logits, valid, agg) if logits is not None and ref_logits is not None else None
                loss, stats = egspo_step_loss(
                    logp, old, ref_logp, advantages, weights, num_tokens,
                    eps_low=cfg.epsilon, eps_high=cfg.epsilon_high, beta=cfg.beta,
                    aggregation=cfg.logp_aggregation, kl=kl,
                )
                acc.backward(loss)
                self._optimizer_step(sums)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            n_mb += 1
        return self._reduce(_means(sums, n_mb))

    # -- diffu-GRPO ---------------------------------------------------------------------------------

    def _diffu_grpo_step(self, step: int) -> dict[str, Any]:
        """d1's schedule (TRL's GRPOTrainer with ``num_iterations``): one rollout batch per accumulation slot,
        then ``num_iterations`` optimizer steps that each accumulate every slot's batch, iteration i with mask
        seed i (docs/algorithm.md#diffu-grpo-the-baseline)."""
        cfg = self.args
        slots = cfg.gradient_accumulation_steps
        timings: dict[str, float] = {}
        batches, advantages, per_batch = [], [], []
        for slot in range(slots):
            batch, rewards, metrics = self._rollout_and_score(step * slots + slot, timings)
            batches.append(batch)
            advantages.append(global_group_advantages(rewards, cfg, gather=self._gather,
                                                      process_index=self.accelerator.process_index).local)
            per_batch.append(metrics)
        metrics = {key: sum(m[key] for m in per_batch) / slots for key in per_batch[0]
                   if isinstance(per_batch[0][key], (int, float))}
        t0 = time.perf_counter()
        metrics.update(self._update_diffu_grpo(batches, advantages, step))
        timings["time/update"] = time.perf_counter() - t0
        return self._step_metrics(metrics, timings, batches)

    def mask_seeds(self, step: int) -> list[int]:
        """The ``num_iterations`` mask seeds of diffu-GRPO's generation cycle ``step`` (a dedicated generator)."""
        seed_gen = stream("mask_seeds", self.args.seed, step)
        return torch.randint(0, 2**31 - 1, (self.args.num_iterations,), generator=seed_gen).tolist()

    def _update_diffu_grpo(self, batches: list[_Batch], advantages: list[torch.Tensor], step: int) -> dict[str, float]:
        # Old, reference and current log-probs all come from the masked estimator on the final
        # sequences, never from the sampler's recorded log-probs: an approximate (cached) rollout
        # changes which completions are sampled but leaves this ratio exact.
        cfg, acc = self.args, self.accelerator
        trajs = [batch.traj.to(acc.device) for batch in batches]
        advs = [adv.to(acc.device) for adv in advantages]
        token_masks = [completion_token_mask(traj.completions, self.dlm.stop_ids) for traj in trajs]
        seeds = self.mask_seeds(step)
        p_mask = cfg.p_mask_prompt
        self.dlm.model.eval()
        # old[j][i] / ref[j][i]: batch j under mask seed i, before any update of this cycle
        old: list[list[torch.Tensor | None]] = []
        ref: list[list[torch.Tensor | None]] = []
        with torch.no_grad(), acc.autocast():
            for traj in trajs:
                old.append([masked_completion_logps(self.dlm, traj, seed, p_mask) if cfg.num_iterations > 1 else None
                            for seed in seeds])
                if cfg.beta > 0:
                    with self.dlm.reference_model() as ref_model:
                        ref.append([masked_completion_logps(self.dlm, traj, seed, p_mask, model=ref_model)
                                    for seed in seeds])
                else:
                    ref.append([None] * len(seeds))
        self.dlm.model.train()
        sums: dict[str, float] = {}
        for i, seed in enumerate(seeds):  # one optimizer step per iteration, accumulating every slot's batch
            for j, traj in enumerate(trajs):
                with acc.accumulate(self.dlm.model), acc.autocast():
                    logp = masked_completion_logps(self.dlm, traj, seed, p_mask)
                    old_ij = old[j][i]
                    loss, stats = diffu_grpo_loss(logp, logp.detach() if old_ij is None else old_ij, ref[j][i],
                                                  advs[j], token_masks[j], eps_low=cfg.epsilon,
                                                  eps_high=cfg.epsilon_high, beta=cfg.beta)
                    acc.backward(loss)
                    self._optimizer_step(sums)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        return self._reduce(_means(sums, len(seeds) * len(trajs)))

    # -- shared -------------------------------------------------------------------------------------

    def _optimizer_step(self, sums: dict[str, float]) -> None:
        norm = optimizer_step(self.accelerator, self.dlm.model, self.optimizer, self.scheduler, self.args.max_grad_norm)
        if self.accelerator.sync_gradients:  # an optimizer step happened: the merged rollout copy is stale
            self.dlm.rollout_weights_changed()
        if norm is not None:
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm
            sums["optimizer_steps"] = sums.get("optimizer_steps", 0.0) + 1

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        if not values:
            return {}
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], device=self.accelerator.device)
        mean = self.accelerator.reduce(tensor, reduction="mean")
        return {k: float(v) for k, v in zip(keys, mean.tolist(), strict=True)}


def _means(sums: dict[str, float], micro_batches: int) -> dict[str, float]:
    """Per-micro-batch means, except the gradient norm: a mean over optimizer steps."""
    steps = sums.pop("optimizer_steps", 0.0)
    out = {k: v / max(micro_batches, 1) for k, v in sums.items()}
    if "grad_norm" in sums:
        out["grad_norm"] = sums["grad_norm"] / max(steps, 1.0)
    return out
