"""``EGSPOTrainer``: the RL loop on accelerate (rollout -> score -> advantages -> updates -> log -> checkpoint).

    from egspo import EGSPOConfig, EGSPOTrainer
    trainer = EGSPOTrainer(model="builtin:sudoku-tiny", reward_funcs=[my_reward], train_dataset=rows,
                           args=EGSPOConfig(output_dir="runs/x", max_steps=20))
    trainer.train()                      # or train(resume_from_checkpoint=True | "runs/x/checkpoint-10")
    trainer.evaluate(); trainer.save_model(); trainer.push_to_hub()

Shaped like TRL's ``GRPOTrainer`` (model, reward_funcs, train_dataset, eval_dataset, args,
processing_class, peft_config, callbacks); ``algorithm="diffu_grpo"`` runs the d1 baseline through the
same loop. ``egspo train`` and ``egspo demo`` are thin layers over this class. Without ``train_dataset``
and ``reward_funcs`` the configured built-in ``task`` supplies both.

One step: every process rolls out its slice of the global batch (``per_device_train_batch_size`` rows,
the G rollouts of a prompt are consecutive rows), rewards are gathered so that group baselines see
whole groups, and the update runs on the process's own rows. EGSPO/EGSPO-SA train on K selected
denoising steps per rollout (micro-batch k = the k-th selected step of every row); diffu-GRPO follows
d1's schedule: a step generates ``gradient_accumulation_steps`` rollout batches, then makes
``num_iterations`` optimizer steps, each accumulating every batch (iteration i with mask seed i).
Randomness of step ``s`` is seeded from (seed, s, process), so a resumed run repeats the
uninterrupted one (docs/algorithm.md). The run's life cycle (launch check, fresh or resumed start,
config and metrics files, checkpoints, SIGINT/SIGTERM, clean-up of a failed start) is
:mod:`egspo.run_lifecycle`, shared with SFT.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn
from tqdm.auto import tqdm

from egspo.config import ConfigError, EGSPOConfig, ModelConfig
from egspo.evaluate import evaluate_rows, get_task_or_fail
from egspo.memory import MemoryPlan, plan_memory
from egspo.models.adapter import DiffusionLM, unwrap
from egspo.models.loading import (
    as_diffusion_lm,
    check_quantization,
    describe_quantization,
    load_model,
    load_tokenizer,
    quantized_bits,
    read_model_config,
)
from egspo.models.lora import prepare_for_training
from egspo.rl.batching import PromptStream
from egspo.rl.callbacks import CallbackHandler
from egspo.rl.data import check_prompts, dataset_rows, is_conversational, prompt_text, reward_prompt
from egspo.rl.metrics import read_metrics
from egspo.rl.rewards import RewardScorer
from egspo.rl.steps import RLSteps
from egspo.rl.tracking import log_samples
from egspo.run_lifecycle import RunLifecycle, StopFlag, TrainingInterrupted, check_writable_target
from egspo.run_setup import (
    make_accelerator,
    make_optimizer,
    prepare_model_and_optimizer,
    prepare_reference,
)
from egspo.tasks import Task
from egspo.tasks.base import side_by_side_metrics

logger = logging.getLogger(__name__)


@dataclass
class TrainOutput:
    """What ``train()`` returns: the last step, its metrics and the run directory."""

    global_step: int
    metrics: dict[str, Any]
    run_dir: Path


def _check_rows(rows: list[dict[str, Any]], fields: tuple[str, ...], where: str) -> None:
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise ConfigError(f"{where}: row {i} lacks column(s) {missing} that the task's rewards need.")


class EGSPOTrainer(RLSteps):
    """RL fine-tuning of a diffusion LM with EGSPO-SA, EGSPO or diffu-GRPO (``args.algorithm``).

    Args:
        model: a local directory, hub name or ``builtin:NAME`` (default ``args.model_name_or_path``), or a
            loaded masked diffusion LM (an egspo LLaDA/Dream model, any ``AutoModelForMaskedLM``, or a peft
            model whose adapter is then trained).
        reward_funcs: reward functions in TRL's signature ``fn(prompts, completions, completion_ids,
            **columns) -> list[float | None]``: callables, partials, objects with ``__call__`` or
            ``"module:function"`` strings. Default: the built-in task's. ``args.reward_funcs`` are added.
        train_dataset / eval_dataset: a list of dicts, a ``datasets.Dataset`` or an iterable dataset with a
            ``prompt`` column (text, or chat messages) and whatever columns the rewards read. Default: the
            task's data (``args.train_file`` / ``eval_file`` or its generator).
        args: the :class:`EGSPOConfig`.
        processing_class: the tokenizer (default: the model's).
        peft_config: a ``peft.LoraConfig`` used instead of ``args.lora_*``.
        callbacks: ``transformers.TrainerCallback`` objects (see :mod:`egspo.rl.callbacks`).
    """

    def __init__(
        self,
        model: str | Path | nn.Module | None = None,
        reward_funcs: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        args: EGSPOConfig | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: Sequence[Any] | None = None,
        *,
        accelerator: Accelerator | None = None,
    ) -> None:
        if args is None:
            args = EGSPOConfig()
        if not isinstance(args, EGSPOConfig):
            raise TypeError(f"args must be an egspo.EGSPOConfig, got {type(args).__name__} (a TRL GRPOConfig or "
                            "TrainingArguments does not carry the diffusion settings).")
        self.args = cfg = args
        self.run_dir = Path(cfg.output_dir)
        self.accelerator = accelerator or make_accelerator(cfg)
        acc = self.accelerator
        self._run = RunLifecycle(cfg, acc)  # the launch check
        cfg.validate(num_processes=acc.num_processes)
        updates = cfg.updates_per_rollout  # micro-batches (backward passes) per training step
        if cfg.step_selection != "adaptive" and updates % cfg.gradient_accumulation_steps:
            logger.warning(
                "%d micro-batches per rollout batch is not a multiple of gradient_accumulation_steps=%d: each batch's "
                "last optimizer step is completed with zero-weight micro-batches (no gradient carries over, but "
                "their forwards cost time); a multiple is faster.", updates, cfg.gradient_accumulation_steps)
        check_writable_target(self.run_dir)
        set_seed(cfg.seed)
        self.sampler_cfg = cfg.rollout_sampler()

        self._setup_data(reward_funcs, train_dataset, eval_dataset)
        self._setup_model(model, processing_class, peft_config)
        params = [p for p in self.dlm.model.parameters() if p.requires_grad]
        optimizer_steps = math.ceil(cfg.max_steps * updates / cfg.gradient_accumulation_steps)
        optimizer, self.scheduler = make_optimizer(params, cfg, optimizer_steps)
        model_prepared, self.optimizer = prepare_model_and_optimizer(acc, self.dlm.model, optimizer, cfg)
        self.dlm: DiffusionLM = dataclasses.replace(self.dlm, model=model_prepared,
                                                    reference=prepare_reference(acc, self.dlm.reference))
        if self.dlm.sharded and cfg.rollout_cache != "none":
            raise ConfigError(
                f"rollout_cache={cfg.rollout_cache!r} is not supported with a sharded model (FSDP / ZeRO-3): use "
                "rollout_cache=none, or DDP / ZeRO-2.")
        global_rows = cfg.per_device_train_batch_size * acc.num_processes
        self.stream = PromptStream(self.train_rows, global_rows // cfg.num_generations, cfg.seed)
        self.callbacks = CallbackHandler(callbacks or [], cfg, cfg.max_steps)
        self.start_step = 0
        self.best: tuple[float, Path] | None = None
        self._samples: list[list[Any]] = []

    @property
    def model(self) -> nn.Module:
        """The policy being trained (a peft model under LoRA), without DDP/FSDP/DeepSpeed wrappers."""
        return self.accelerator.unwrap_model(self.dlm.model)

    # -- set-up -----------------------------------------------------------------------------------

    def _setup_data(self, reward_funcs: Any, train_dataset: Any, eval_dataset: Any) -> None:
        cfg = self.args
        task = get_task_or_fail(cfg.task)
        if train_dataset is None:
            try:
                self.train_rows = task.load(cfg.train_file, "train", cfg.num_train, cfg.seed, **cfg.task_options)
            except (TypeError, ValueError) as exc:
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(f"task={cfg.task!r}: could not load the training data from "
                                  f"{cfg.train_file or 'its generator'}: {exc}") from exc
            where = cfg.train_file or f"{cfg.task} generator"
        else:
            self.train_rows = dataset_rows(train_dataset, "train_dataset")
            where = "train_dataset"
        user_prompts = "prompt" in self.train_rows[0]
        # the task reads rows without a prompt column (its own rows); user prompts make it a custom run
        self.task: Task | None = task if not user_prompts or task.name == "custom" else None
        check_prompts(self.train_rows, None if user_prompts else task, where)
        self.conversational = is_conversational(self.train_rows[0])
        self._eval_dataset = eval_dataset
        self._eval_rows: list[dict[str, Any]] | None = None
        task_functions = task.reward_functions() if reward_funcs is None else []
        if reward_funcs is not None and not isinstance(reward_funcs, (list, tuple)):
            reward_funcs = [reward_funcs]
        if task_functions:
            _check_rows(self.train_rows, task.answer_fields, where)
        self.scorer = RewardScorer.build(task_functions, [*(reward_funcs or []), *cfg.reward_funcs],
                                         cfg.reward_weights, columns=sorted(self.train_rows[0]))

    def _setup_model(self, model: Any, processing_class: Any, peft_config: Any) -> None:
        cfg, acc = self.args, self.accelerator
        if model is None:
            model = cfg.model_name_or_path
        if not isinstance(model, (str, Path, nn.Module)):
            raise TypeError(f"model must be a name, a path or a loaded model, got {type(model).__name__}.")
        module = model if isinstance(model, nn.Module) else None
        self.model_id = (str(getattr(unwrap(module), "name_or_path", "") or cfg.model_name_or_path)
                         if module is not None else str(model))
        model_cfg = cfg.model_config(self.model_id)
        if peft_config is not None:
            model_cfg = dataclasses.replace(model_cfg, lora=True)
        # everything that can be refused is refused here, before any weight is read
        bits = quantized_bits(module) if module is not None else None
        self._check_quantized_run(model_cfg, bits)
        core_config: Any = getattr(unwrap(module), "config", None) if module is not None else None
        self.memory_plan = self._plan_memory(
            core_config.to_dict() if core_config is not None else read_model_config(self.model_id), peft_config, bits)
        if self.memory_plan is not None:
            model_cfg = dataclasses.replace(model_cfg, gradient_checkpointing=self.memory_plan.gradient_checkpointing)
            if self.sampler_cfg.merge_lora and not self.memory_plan.merge_lora_rollout:
                self.sampler_cfg = dataclasses.replace(self.sampler_cfg, merge_lora=False)
        if module is not None:
            tokenizer = processing_class or load_tokenizer(model_cfg)
            # a quantised model was placed when it was loaded (bitsandbytes models are not moved)
            dlm = as_diffusion_lm(module if bits else module.to(acc.device), tokenizer)
        else:
            dlm, tokenizer = load_model(model_cfg, device=acc.device)
        if processing_class is not None:
            tokenizer = processing_class
            tokenizer.padding_side = "left"
        self.processing_class = tokenizer
        if cfg.rollout_cache != "none" and not dlm.native:
            raise ConfigError(
                f"rollout_cache={cfg.rollout_cache!r} needs the native LLaDA or Dream models; {self.model_id} loads "
                "as a generic masked LM: use rollout_cache=none.")
        if (model_cfg.lora and (peft_config.lora_dropout if peft_config is not None else cfg.lora_dropout) > 0):
            logger.warning("LoRA dropout > 0: rollouts run in eval mode (no dropout) and updates in train mode, so "
                           "the policy ratio is not 1 at the first update; RL runs usually set lora_dropout=0.")
        dlm = prepare_for_training(dlm, model_cfg, need_reference=cfg.beta > 0, peft_config=peft_config)
        peft_configs = getattr(dlm.model, "peft_config", None)
        if isinstance(peft_configs, dict):  # record the base as named, not where it was installed
            for adapter in peft_configs.values():
                adapter.base_model_name_or_path = self.model_id
        self.dlm = dlm

    def _check_quantized_run(self, model_cfg: ModelConfig, bits: int | None) -> None:
        """Refuse a quantised (bitsandbytes) run that cannot work, each with a sentence; ``bits`` is the
        quantisation of an already-loaded model (None: loading it is still to come, by ``model_cfg``)."""
        cfg, acc = self.args, self.accelerator
        if bits is None:
            check_quantization(model_cfg, acc.device)
            if not (model_cfg.load_in_4bit or model_cfg.load_in_8bit):
                return
            field = "load_in_4bit" if model_cfg.load_in_4bit else "load_in_8bit"
        else:
            field = f"a {bits}-bit (bitsandbytes) model"
        if cfg.compile_rollout:
            raise ConfigError(
                f"compile_rollout=true with {field}: torch.compile of bitsandbytes' quantised layers is not verified "
                "in egspo, so it is refused; set compile_rollout=false (the quantised rollout runs eager).")
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ConfigError(
                f"{field} with {acc.distributed_type.value}: egspo trains a quantised base with one whole copy per "
                "process (one GPU, or DDP); sharding quantised weights is not supported. Launch without "
                "FSDP/DeepSpeed.")

    def _plan_memory(self, model_config: dict[str, Any], peft_config: Any, bits: int | None) -> MemoryPlan | None:
        """The memory plan for ``max_memory_gb`` (None when it is not set); refused budgets raise here."""
        cfg, acc = self.args, self.accelerator
        if cfg.max_memory_gb is None:
            return None
        plan = plan_memory(model_config, cfg, device_type=acc.device.type,
                           mixed_precision=acc.mixed_precision == "bf16", peft_config=peft_config,
                           quantized_bits=bits)
        plan.log(logger)
        if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            logger.warning("The memory plan assumes whole weights on every process; with %s sharding it is an upper "
                           "bound.", acc.distributed_type.value)
        return plan

    # -- checkpoints, evaluation, the loop --------------------------------------------------------

    def _save(self, step: int) -> Path:
        path = self._run.save(
            step, model=self.dlm.model, optimizer=self.optimizer, scheduler=self.scheduler,
            tokenizer=self.processing_class,
            trainer_state={"data_position": step * self.stream.prompts_per_step,
                           "best": None if self.best is None else [self.best[0], self.best[1].name]},
            protect=None if self.best is None else self.best[1],
        )
        self.callbacks("on_save", trainer=self, checkpoint=path)
        return path

    def _load(self, checkpoint: Path) -> dict[str, Any]:
        """Restore ``checkpoint`` (model, optimizer, scheduler) and return its trainer state; the merged rollout
        copy resyncs at the next rollout."""
        state = self._run.load(checkpoint, model=self.dlm.model, optimizer=self.optimizer, scheduler=self.scheduler)
        self.dlm.rollout_weights_changed()
        return state

    def eval_rows(self) -> list[dict[str, Any]]:
        """The evaluation rows: ``eval_dataset``, else the task's test data (``eval_file`` or its generator)."""
        if self._eval_rows is None:
            cfg = self.args
            if self._eval_dataset is not None:
                rows = dataset_rows(self._eval_dataset, "eval_dataset")
                check_prompts(rows, None if "prompt" in rows[0] else get_task_or_fail(cfg.task), "eval_dataset")
            elif self.task is not None and not (self.task.name == "custom" and cfg.eval_file is None):
                rows = self.task.load(cfg.eval_file, "test", cfg.num_eval, cfg.seed, **cfg.task_options)
            else:
                raise ConfigError("No evaluation data: pass eval_dataset=... to EGSPOTrainer or set eval_file.")
            self._eval_rows = rows[: cfg.eval_limit] if cfg.eval_limit is not None else rows
        return self._eval_rows

    @torch.no_grad()
    def evaluate(self, eval_dataset: Any = None) -> dict[str, float]:
        """Greedy generation (the eval settings) on the evaluation rows at every eval completion length:
        the task's metrics and the mean reward, as ``eval_{metric}`` (``eval_{metric}_{L}`` with several
        lengths). Each process generates a share of the rows."""
        cfg, acc = self.args, self.accelerator
        if eval_dataset is not None:
            self._eval_dataset, self._eval_rows = eval_dataset, None
        rows = self.eval_rows()
        eval_cfg = cfg.eval_config()
        n = acc.num_processes
        share = rows[acc.process_index::n] or rows[:1]
        padded = share + share[-1:] * (math.ceil(len(rows) / n) - len(share))  # same forwards on every process
        results: dict[str, float] = {}
        for length in eval_cfg.gen_lengths:
            with self.dlm.evaluating():
                completions, _ = evaluate_rows(self.dlm, self.processing_class, self.task, padded,
                                               eval_cfg.sampler_for(length), batch_size=eval_cfg.batch_size,
                                               seed=cfg.seed, metrics=False)
            completions = completions[: len(share)]
            local = side_by_side_metrics(self.task, completions, share, cfg.scoring_protocol) \
                if self.task is not None else {}
            prompts = [reward_prompt(row, prompt_text(self.processing_class, row, self.task, for_eval=True))
                       for row in share]
            rewards, _ = self.scorer.score(prompts, completions, share, conversational=self.conversational)
            local["reward"] = float(rewards.mean())
            keys = sorted(k for k, v in local.items() if isinstance(v, (int, float)))
            values = torch.tensor([[float(local[k]) * len(share) for k in keys] + [len(share)]], device=acc.device)
            totals = acc.gather(values).sum(0)
            suffix = f"_{length}" if len(eval_cfg.gen_lengths) > 1 else ""
            for i, key in enumerate(keys):
                results[f"eval_{key}{suffix}"] = float(totals[i] / totals[-1])
        self.callbacks("on_evaluate", trainer=self, metrics=results)
        return results

    def _eval_score(self, metrics: dict[str, float]) -> float:
        """The number ``load_best_model_at_end`` maximises: eval accuracy (first length), else eval reward."""
        for key in sorted(metrics):
            if key.startswith("eval_accuracy") and not math.isnan(metrics[key]):
                return metrics[key]
        return next(v for k, v in sorted(metrics.items()) if k.startswith("eval_reward"))

    def train(self, resume_from_checkpoint: bool | str | Path | None = None) -> TrainOutput:
        """Train to ``max_steps``; ``resume_from_checkpoint`` True (the newest intact checkpoint of
        output_dir) or a checkpoint directory continues a run exactly. SIGINT/SIGTERM save a checkpoint
        and raise :class:`TrainingInterrupted`. A run that fails before its first checkpoint removes the
        output directory it created."""
        cfg, acc = self.args, self.accelerator
        step = self.start_step
        with self._run.opened(resume_from_checkpoint) as ckpt:
            if ckpt is not None:
                state = self._load(ckpt)
                step = self.start_step = state["step"]
                if state.get("best"):
                    self.best = (state["best"][0], self.run_dir / state["best"][1])
            if self._run.finished(step):
                return TrainOutput(step, {}, self.run_dir)
            self.metrics = self._run.begin(step)
            if cfg.report_to:
                acc.init_trackers("egspo", config=_flat(cfg.to_dict()))
            self.callbacks.state.global_step = step
            self.callbacks("on_train_begin", trainer=self)
            step, metrics = self._loop(step)
        return TrainOutput(step, metrics, self.run_dir)

    def _loop(self, step: int) -> tuple[int, dict[str, Any]]:
        cfg, acc = self.args, self.accelerator
        bar = tqdm(total=cfg.max_steps, initial=step, desc="egspo train", disable=not acc.is_main_process,
                   dynamic_ncols=True)
        eval_every = cfg.eval_steps or cfg.save_steps or cfg.max_steps
        metrics: dict[str, Any] = {}
        with StopFlag() as stop:
            while step < cfg.max_steps:
                self.callbacks("on_step_begin", trainer=self)
                metrics = self.step(step)
                step += 1
                metrics["step"] = step
                self.callbacks.state.global_step = step
                evaluating = cfg.eval_strategy == "steps" and (step % eval_every == 0 or step == cfg.max_steps)
                if evaluating:
                    metrics.update(self.evaluate())
                if step % cfg.logging_steps == 0 or step == cfg.max_steps or evaluating:
                    self.metrics.write(metrics)
                    log_samples(acc, self.run_dir, self._samples, step)
                    if cfg.report_to:
                        acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
                    self.callbacks("on_log", trainer=self, logs=metrics)
                bar.update(1)
                postfix = {"reward": f"{metrics['reward/mean']:.3f}", "kl": f"{metrics.get('kl', 0.0):.4f}"}
                if "accuracy" in metrics:
                    postfix["acc"] = f"{metrics['accuracy']:.1f}"
                bar.set_postfix(postfix)
                control = self.callbacks("on_step_end", trainer=self)
                stopping = bool(stop.agreed(acc)) or control.should_training_stop
                better = evaluating and cfg.load_best_model_at_end and (
                    self.best is None or self._eval_score(metrics) > self.best[0])
                if self._run.checkpoint_due(step, stopping, better, control.should_save):
                    path = self._save(step)
                    if better:
                        self.best = (self._eval_score(metrics), path)
                    control.should_save = False
                if stopping:
                    bar.close()
                    if stop.signum is not None:
                        raise TrainingInterrupted(stop.signum, step, self.run_dir)
                    break
        bar.close()
        self._finish()
        return step, metrics

    def _finish(self) -> None:
        cfg, acc = self.args, self.accelerator
        if cfg.load_best_model_at_end and self.best is not None:
            logger.info("Loading the best checkpoint %s (eval %.3f).", self.best[1], self.best[0])
            self._load(self.best[1])
        acc.wait_for_everyone()
        if acc.is_main_process:
            from egspo.report import write_run_report

            write_run_report(self.run_dir, cfg, read_metrics(self.run_dir / "metrics.jsonl"))
        self.callbacks("on_train_end", trainer=self)
        if cfg.push_to_hub:
            self.push_to_hub()
        if cfg.report_to or torch.cuda.is_available():
            # closes trackers and the NCCL group; gloo's destroy can hang one rank, so CPU runs skip it
            acc.end_training()

    # -- saving and sharing -----------------------------------------------------------------------

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """Write the trained model to ``output_dir`` (default: the run directory): the LoRA adapter (its
        config names the base model as given, e.g. a hub id or ``builtin:NAME``) or the full weights, the
        tokenizer, the generation settings and a model card (README.md)."""
        from egspo.hub import write_model_card

        out = Path(output_dir or self.run_dir)
        acc = self.accelerator
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.dlm.model)
        if acc.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out)
            self.processing_class.save_pretrained(out)
            adapter = hasattr(model, "peft_config")
            write_model_card(out, self.args, base_model=self.model_id, adapter=adapter, run_dir=self.run_dir)
            if adapter:
                bits = quantized_bits(model)
                quantized = describe_quantization(self.args.model_config(self.model_id)) or (
                    f"{bits}-bit bitsandbytes base" if bits else "")
                logger.info("Saved the LoRA adapter only to %s: it applies to the base model %s (adapter_config.json "
                            "base_model_name_or_path)%s.", out, self.model_id,
                            f", trained on its {quantized}; load the base in bf16 or quantised again" if quantized
                            else "")
            else:
                logger.info("Saved the model to %s", out)
        acc.wait_for_everyone()
        return out

    def push_to_hub(self, commit_message: str = "egspo: end of training") -> str:
        """Save the model (:meth:`save_model`) and upload it to ``hub_model_id``; returns the repository URL.
        Offline, fails at once with a sentence (the folder is still written)."""
        from egspo.hub import push_folder

        folder = self.save_model()
        repo_id = self.args.hub_model_id or self.run_dir.resolve().name
        if not self.accelerator.is_main_process:
            return repo_id
        return push_folder(folder, repo_id, private=self.args.hub_private_repo, commit_message=commit_message)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def train(cfg: EGSPOConfig, resume: bool = False) -> Path:
    """Run RL training on the configured task; returns the run directory."""
    return EGSPOTrainer(args=cfg).train(resume_from_checkpoint=resume or None).run_dir
