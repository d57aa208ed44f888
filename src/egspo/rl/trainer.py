"""The RL loop on accelerate: rollout -> score -> advantages -> K updates -> log -> checkpoint.

    from egspo import load_config
    from egspo.rl.trainer import train
    run_dir = train(load_config("configs/tiny_sudoku.yaml", ["train.max_steps=20"]))

One step: every process rolls out its slice of the global batch (``per_device_batch_size`` rows, the
G rollouts of a prompt are consecutive rows), rewards are gathered so that group baselines see
whole groups, and the update runs on the process's own rows. EGSPO/EGSPO-SA train on K selected
denoising steps per rollout (micro-batch k = the k-th selected step of every row); diffu-GRPO runs
``num_iterations`` masked-estimator passes over the batch. Randomness of step ``s`` is seeded from
(seed, s, process), so a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from egspo.checkpoint import check_fresh_or_resume, latest_checkpoint, load_checkpoint, save_checkpoint
from egspo.config import Config, ConfigError, save_config
from egspo.models.loading import load_model
from egspo.models.lora import prepare_for_training
from egspo.rl.advantages import zero_variance_groups
from egspo.rl.distributed import agreed_max, check_launch, global_group_advantages, global_stepwise_advantages
from egspo.rl.batching import PromptStream, encode_prompts
from egspo.rl.estimators import action_logps, masked_completion_logps
from egspo.rl.losses import completion_token_mask, diffu_grpo_loss, egspo_step_loss, kl_exact
from egspo.rl.metrics import MetricsWriter, step_histogram
from egspo.rl.rewards import RewardScorer
from egspo.rl.selection import SelectedSteps, select_steps
from egspo.run_setup import (check_output_dir, clip_gradients, make_accelerator, make_optimizer,
                              prepare_model_and_optimizer, prepare_reference)
from egspo.sampling import sample
from egspo.tasks import format_prompt, get_task
from egspo.trajectory import Trajectory

logger = logging.getLogger(__name__)


@dataclass
class _Batch:
    rows: list[dict[str, Any]]
    prompts: list[str]
    traj: Trajectory
    completions: list[str]


class _StopFlag:
    """Set by SIGTERM/SIGINT: the loop saves a checkpoint after the current step and exits."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("Received signal %d: finishing this step, saving a checkpoint and exiting.", signum)
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_rows(rows: list[dict[str, Any]], fields: tuple[str, ...], where: str) -> None:
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ConfigError(f"{where}: row {i} lacks column(s) {missing} that the task's rewards need.")


class RLTrainer:
    """Holds the model, optimizer and data of one RL run; ``run()`` trains to ``train.max_steps``."""

    def __init__(self, cfg: Config, resume: bool = False, accelerator: Accelerator | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.train.output_dir)
        self.accelerator = accelerator or make_accelerator(cfg.train)
        acc = self.accelerator
        check_launch(acc.num_processes)
        cfg.validate(num_processes=acc.num_processes)
        updates = cfg.rl.num_iterations if cfg.rl.algorithm == "diffu_grpo" else (
            cfg.rl.num_selected_steps // cfg.rl.steps_per_microbatch)
        if cfg.rl.step_selection != "adaptive" and updates % cfg.train.gradient_accumulation_steps:
            raise ConfigError(
                f"{updates} micro-batches per rollout batch is not a multiple of train.gradient_accumulation_steps="
                f"{cfg.train.gradient_accumulation_steps}: gradients would carry over between rollout batches."
            )
        check_output_dir(self.run_dir)
        check_fresh_or_resume(self.run_dir, resume)
        set_seed(cfg.train.seed)

        self.task = get_task(cfg.task.name)
        self.train_rows = self.task.load(cfg.task.train_file, "train", cfg.task.num_train, cfg.train.seed,
                                         **cfg.task.options)
        _check_rows(self.train_rows, self.task.answer_fields, cfg.task.train_file or f"{cfg.task.name} generator")
        self.scorer = RewardScorer.for_task(self.task, cfg.task.extra_reward_funcs, cfg.task.reward_weights)

        dlm, self.tokenizer = load_model(cfg.model, device=acc.device)
        if cfg.sampler.cache != "none" and not dlm.native:
            raise ConfigError(
                f"sampler.cache={cfg.sampler.cache!r} needs the native LLaDA or Dream models; "
                f"{cfg.model.name_or_path} loads as a generic masked LM: use sampler.cache=none."
            )
        dlm = prepare_for_training(dlm, cfg.model, need_reference=cfg.rl.beta > 0)
        model = dlm.model
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer_steps = math.ceil(cfg.train.max_steps * updates / cfg.train.gradient_accumulation_steps)
        optimizer, self.scheduler = make_optimizer(params, cfg.train, optimizer_steps)
        model, self.optimizer = prepare_model_and_optimizer(acc, model, optimizer, cfg.train)
        self.dlm = dataclasses.replace(dlm, model=model, reference=prepare_reference(acc, dlm.reference))
        if self.dlm.sharded and cfg.sampler.cache != "none":
            raise ConfigError(
                f"sampler.cache={cfg.sampler.cache!r} is not supported with a sharded model (FSDP / ZeRO-3): "
                "use sampler.cache=none, or DDP / ZeRO-2."
            )

        global_rows = cfg.train.per_device_batch_size * acc.num_processes
        self.stream = PromptStream(self.train_rows, global_rows // cfg.rl.num_generations, cfg.train.seed)
        self.start_step = 0
        if resume:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                logger.warning("--resume: no checkpoint in %s, starting from scratch.", self.run_dir)
            else:
                state = load_checkpoint(ckpt, model=model, optimizer=self.optimizer, scheduler=self.scheduler,
                                        process_index=acc.process_index)
                self.start_step = state["step"]
        if acc.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=acc.is_main_process,
                                     truncate_after=self.start_step)
        if cfg.train.report_to:
            acc.init_trackers("egspo", config=_flat(cfg.to_dict()))

    # -- one step ---------------------------------------------------------------------------------

    def _rollout(self, step: int) -> _Batch:
        cfg, acc = self.cfg, self.accelerator
        group_rows = self.stream.batch(step)
        rows_global = [row for row in group_rows for _ in range(cfg.rl.num_generations)]
        b = cfg.train.per_device_batch_size
        rows = rows_global[acc.process_index * b : (acc.process_index + 1) * b]
        prompts = [format_prompt(self.tokenizer, self.task.messages(row)) for row in rows]
        ids, mask = encode_prompts(self.tokenizer, prompts, cfg.task.max_prompt_length, acc.device)
        generator = torch.Generator(device=acc.device).manual_seed(
            cfg.train.seed * 1_000_003 + step * 1009 + acc.process_index)
        with acc.autocast():
            traj = sample(self.dlm, ids, cfg.sampler, attention_mask=mask, generator=generator,
                          record_greedy=cfg.rl.algorithm != "diffu_grpo" and bool(cfg.rl.stepwise_lambda))
        completions = self.tokenizer.batch_decode(traj.completions, skip_special_tokens=True)
        return _Batch(rows=rows, prompts=prompts, traj=traj, completions=completions)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(x.to(self.accelerator.device).contiguous()).cpu()

    def _agreed_k(self, k: int) -> int:
        return agreed_max(k, self._gather)

    def step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        batch = self._rollout(step)
        timings["time/rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rewards, per_fn = self.scorer.score(batch.prompts, batch.completions, batch.rows)
        all_rewards = self._gather(rewards)
        metrics: dict[str, float] = {
            "reward/mean": float(all_rewards.mean()),
            "reward/std": float(all_rewards.std()) if all_rewards.numel() > 1 else 0.0,
            "zero_variance_groups": zero_variance_groups(all_rewards, cfg.rl.num_generations),
        }
        all_fn = self._gather(per_fn)
        for j, name in enumerate(self.scorer.names):
            col = all_fn[:, j]
            metrics[f"reward/{name}/mean"] = float(col.nanmean()) if (~col.isnan()).any() else float("nan")
            metrics[f"reward/{name}/std"] = float(col[~col.isnan()].std()) if (~col.isnan()).sum() > 1 else 0.0
        task_metrics = self.task.metrics(batch.completions, batch.rows)
        metrics["accuracy"] = float(self._gather(torch.tensor([task_metrics["accuracy"]])).mean())
        metrics["completion_tokens"] = float(self._gather(
            completion_token_mask(batch.traj.completions, self.dlm.stop_ids).sum(1).float()).mean())

        if cfg.rl.algorithm == "diffu_grpo":
            timings["time/score"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics.update(self._update_diffu_grpo(batch, rewards, step))
        else:
            selected = self._select(batch.traj, step)
            adv, score_metrics = self._egspo_advantages(batch, selected, rewards)
            metrics.update(score_metrics)
            timings["time/score"] = time.perf_counter() - t0
            old_logps = None
            if cfg.sampler.cache != "none":
                t0 = time.perf_counter()
                old_logps, gap = self._exact_old_logps(batch.traj, selected)
                metrics["approx/old_logp_gap"] = gap
                timings["time/old_logps"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            metrics.update(self._update_egspo(batch, selected, adv, old_logps))
        timings["time/update"] = time.perf_counter() - t0
        metrics.update(timings)
        total_tokens = float(self._gather(torch.tensor([batch.traj.sequences.numel()])).sum())
        metrics["tokens_per_second"] = total_tokens / max(sum(timings.values()), 1e-9)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    # -- EGSPO / EGSPO-SA ---------------------------------------------------------------------------

    def _select(self, traj: Trajectory, step: int) -> SelectedSteps:
        cfg = self.cfg
        generator = torch.Generator(device=traj.step_entropy.device).manual_seed(
            cfg.train.seed * 7919 + step * 31 + self.accelerator.process_index)
        return select_steps(
            traj.step_entropy, cfg.rl.num_selected_steps, cfg.rl.step_selection,
            valid_steps=traj.valid_steps, last_content_step=traj.last_content_step,
            stop_at_last_content=cfg.rl.stop_at_last_content, alpha=cfg.rl.adaptive_alpha,
            generator=generator, k_max_reduce=self._agreed_k,
        )

    def _egspo_advantages(
        self, batch: _Batch, selected: SelectedSteps, rewards: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, acc = self.cfg, self.accelerator
        traj = batch.traj
        k = selected.steps.shape[1]
        metrics: dict[str, float] = {}
        greedy_rewards = None
        if cfg.rl.stepwise_lambda:
            greedy = traj.greedy_completions(selected.steps)  # (B, K, L_c)
            texts = self.tokenizer.batch_decode(greedy.flatten(0, 1), skip_special_tokens=True)
            rows = [row for row in batch.rows for _ in range(k)]
            prompts = [p for p in batch.prompts for _ in range(k)]
            greedy_rewards, _ = self.scorer.score(prompts, texts, rows,
                                                  correctness_only=cfg.rl.step_reward_correctness_only)
            greedy_rewards = greedy_rewards.view(-1, k)
        result = global_stepwise_advantages(rewards, greedy_rewards, selected.weights.float(), cfg.rl,
                                            gather=self._gather, process_index=acc.process_index)
        adv = result.local
        if greedy_rewards is not None:
            metrics["reward/greedy_mean"] = float(result.greedy.mean())
        ent = traj.step_entropy
        valid = traj.valid_steps
        sel_ent = ent.gather(1, selected.steps.to(ent.device))
        w = selected.weights.to(ent.device)
        metrics["entropy/selected"] = float(self._gather(((sel_ent * w).sum() / w.sum().clamp_min(1)).view(1)).mean())
        metrics["entropy/all"] = float(self._gather(((ent * valid).sum() / valid.sum().clamp_min(1)).view(1)).mean())
        metrics["selected_steps_histogram"] = step_histogram(self._gather(selected.steps), self._gather(selected.weights),
                                                             traj.num_steps)
        metrics["selected_per_rollout"] = float(result.weights.sum(1).mean())
        return adv.to(acc.device), metrics

    @torch.no_grad()
    def _exact_old_logps(self, traj: Trajectory, selected: SelectedSteps) -> tuple[torch.Tensor, float]:
        """(B, K) step log-probs (sums) of the selected actions under the exact model, and the mean
        |approximate - exact| over the real selections.

        A cached rollout (``sampler.cache``) records log-probs of an approximate forward, so a ratio
        against them would not start at 1 and the clip would act on the approximation error. They are
        recomputed here with the exact forward, before any update of this batch (the model is still the
        rollout's policy), in eval mode as the rollout ran: one forward per selected-step slot, batched
        over the rows.
        """
        acc = self.accelerator
        traj = traj.to(acc.device)
        steps = selected.steps.to(acc.device)
        with self.dlm.evaluating(), acc.autocast():
            exact = torch.stack([action_logps(self.dlm, traj, steps[:, k])[0].float()
                                 for k in range(steps.shape[1])], dim=1)
        approx = traj.step_logps.gather(1, steps)
        weights = selected.weights.to(acc.device).float()
        gap_sum = ((approx - exact).abs() * weights).sum().view(1)
        totals = self._gather(torch.cat([gap_sum, weights.sum().view(1)]).view(1, 2)).sum(0)
        return exact, float(totals[0] / totals[1].clamp_min(1))

    def _update_egspo(
        self, batch: _Batch, selected: SelectedSteps, adv: torch.Tensor, old_logps: torch.Tensor | None = None
    ) -> dict[str, float]:
        """K micro-batch updates; ``old_logps`` (B, K) replaces the sampler's recorded step log-probs
        (the exact ones of an approximate, cached rollout)."""
        cfg, acc = self.cfg, self.accelerator
        traj = batch.traj.to(acc.device)
        steps_all = selected.steps.to(acc.device)
        weights_all = selected.weights.to(acc.device)
        per_mb = cfg.rl.steps_per_microbatch
        exact = cfg.rl.kl_estimator == "exact"
        agg = cfg.rl.logp_aggregation
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
            if cfg.rl.logp_aggregation == "mean":
                old = old / ntok.clamp_min(1)
            ref_logp, ref_logits = None, None
            if cfg.rl.beta > 0:
                with torch.no_grad(), self.dlm.reference_model() as ref, acc.autocast():
                    ref_logp, _, _, ref_logits = action_logps(self.dlm, sub, steps, aggregation=agg, model=ref,
                                                              with_logits=exact)
            with acc.accumulate(self.dlm.model), acc.autocast():
                logp, num_tokens, valid, logits = action_logps(self.dlm, sub, steps, aggregation=agg, with_logits=exact)
                kl = kl_exact(logits, ref_logits, valid) if exact and ref_logits is not None else None
                loss, stats = egspo_step_loss(
                    logp, old, ref_logp, advantages, weights, num_tokens,
                    eps_low=cfg.rl.epsilon_low, eps_high=cfg.rl.epsilon_high, beta=cfg.rl.beta,
                    aggregation=cfg.rl.logp_aggregation, kl=kl,
                )
                acc.backward(loss)
                self._optimizer_step(sums)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            n_mb += 1
        return self._reduce(_means(sums, n_mb))

    # -- diffu-GRPO ---------------------------------------------------------------------------------

    def _update_diffu_grpo(self, batch: _Batch, rewards: torch.Tensor, step: int) -> dict[str, float]:
        # Old, reference and current log-probs all come from the masked estimator on the final
        # sequences, never from the sampler's recorded log-probs: an approximate (cached) rollout
        # changes which completions are sampled but leaves this ratio exact.
        cfg, acc = self.cfg, self.accelerator
        traj = batch.traj.to(acc.device)
        adv = global_group_advantages(rewards, cfg.rl, gather=self._gather,
                                      process_index=acc.process_index).local.to(acc.device)
        token_mask = completion_token_mask(traj.completions, self.dlm.stop_ids)
        seed_gen = torch.Generator().manual_seed(cfg.train.seed * 104_729 + step)
        seeds = torch.randint(0, 2**31 - 1, (cfg.rl.num_iterations,), generator=seed_gen).tolist()
        p_mask = cfg.rl.p_mask_prompt
        self.dlm.model.eval()
        old, ref = [], []
        with torch.no_grad(), acc.autocast():
            for seed in seeds:
                old.append(masked_completion_logps(self.dlm, traj, seed, p_mask) if cfg.rl.num_iterations > 1 else None)
                if cfg.rl.beta > 0:
                    with self.dlm.reference_model() as ref_model:
                        ref.append(masked_completion_logps(self.dlm, traj, seed, p_mask, model=ref_model))
                else:
                    ref.append(None)
        self.dlm.model.train()
        sums: dict[str, float] = {}
        for i, seed in enumerate(seeds):
            with acc.accumulate(self.dlm.model), acc.autocast():
                logp = masked_completion_logps(self.dlm, traj, seed, p_mask)
                old_i = old[i] if old[i] is not None else logp.detach()
                loss, stats = diffu_grpo_loss(logp, old_i, ref[i], adv, token_mask,
                                              eps=cfg.rl.epsilon_high, beta=cfg.rl.beta)
                acc.backward(loss)
                self._optimizer_step(sums)
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return self._reduce(_means(sums, len(seeds)))

    # -- shared -------------------------------------------------------------------------------------

    def _optimizer_step(self, sums: dict[str, float]) -> None:
        acc = self.accelerator
        if acc.sync_gradients:
            if self.cfg.train.max_grad_norm > 0:
                norm = clip_gradients(acc, self.dlm.model, self.cfg.train.max_grad_norm)
                if norm is not None:
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm
                    sums["optimizer_steps"] = sums.get("optimizer_steps", 0.0) + 1
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def _reduce(self, values: dict[str, float]) -> dict[str, float]:
        if not values:
            return {}
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], device=self.accelerator.device)
        mean = self.accelerator.reduce(tensor, reduction="mean")
        return {k: float(v) for k, v in zip(keys, mean.tolist(), strict=True)}

    def save(self, step: int) -> Path:
        acc = self.accelerator
        return save_checkpoint(
            self.run_dir, step, model=self.dlm.model, optimizer=self.optimizer, scheduler=self.scheduler,
            config=self.cfg, trainer_state={"data_position": step * self.stream.prompts_per_step},
            process_index=acc.process_index, num_processes=acc.num_processes, wait=acc.wait_for_everyone,
            keep_last=self.cfg.train.keep_last, tokenizer=self.tokenizer,
        )

    def run(self, on_step: Callable[[int, dict[str, float]], None] | None = None) -> Path:
        cfg, acc = self.cfg, self.accelerator
        bar = tqdm(total=cfg.train.max_steps, initial=self.start_step, desc="egspo train",
                   disable=not acc.is_main_process, dynamic_ncols=True)
        step = self.start_step
        with _StopFlag() as stop:
            while step < cfg.train.max_steps:
                metrics = self.step(step)
                step += 1
                metrics["step"] = step
                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    self.metrics.write(metrics)
                    if cfg.train.report_to:
                        acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc=f"{metrics['accuracy']:.1f}",
                                kl=f"{metrics.get('kl', 0.0):.4f}")
                if on_step is not None:
                    on_step(step, metrics)
                stopping = bool(self._gather(torch.tensor([float(stop.raised)])).max())
                if stopping or step == cfg.train.max_steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
                    self.save(step)
                if stopping:
                    logger.warning("Stopped at step %d; resume with --resume.", step)
                    break
        bar.close()
        acc.wait_for_everyone()
        if cfg.train.report_to or torch.cuda.is_available():
            # closes trackers and the NCCL group; gloo's destroy can hang one rank, so CPU runs skip it
            acc.end_training()
        return self.run_dir


def _means(sums: dict[str, float], micro_batches: int) -> dict[str, float]:
    """Per-micro-batch means, except the gradient norm: a mean over optimizer steps."""
    steps = sums.pop("optimizer_steps", 0.0)
    out = {k: v / max(micro_batches, 1) for k, v in sums.items()}
    if "grad_norm" in sums:
        out["grad_norm"] = sums["grad_norm"] / max(steps, 1.0)
    return out


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def train(cfg: Config, resume: bool = False) -> Path:
    """Run RL training as configured; returns the run directory."""
    return RLTrainer(cfg, resume=resume).run()
