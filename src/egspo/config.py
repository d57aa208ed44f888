"""Run configuration: one flat, TRL-named dataclass (:class:`EGSPOConfig`), YAML loading and overrides.

    from egspo import EGSPOConfig
    args = EGSPOConfig(output_dir="runs/x", max_steps=10, num_generations=8, learning_rate=3e-5)
    args = load_config("configs/llada/gsm8k_egspo_sa.yaml", ["beta=0.0", "max_steps=10"])
    save_config(args, run_dir / "config.yaml")

Where a field means what a field of TRL's ``GRPOConfig`` means it has TRL's name (``output_dir``,
``per_device_train_batch_size``, ``num_generations``, ``max_completion_length``, ``beta``, ``epsilon``,
``epsilon_high``, ``save_steps``, ...); diffusion fields keep d1's names (``block_length``,
``diffusion_steps``, ``p_mask_prompt``, ``remasking``); EGSPO's own fields are named for what they mean.
Every field carries its help text in ``metadata["help"]``; ``__post_init__`` rejects inconsistent
settings with a sentence naming the field, and warns about options the chosen algorithm does not use.

YAML files are flat (``beta: 0.04``). The sectioned files of egspo 0.1 (``rl: {beta: 0.04}``) and
``section.field=value`` overrides still load, with a deprecation warning naming each new field.

Three small parameter objects serve the components that do not need a whole run's settings:
:class:`ModelConfig` (loading, LoRA), :class:`SamplerConfig` (the block sampler) and :class:`EvalConfig`
(evaluation generation); a run derives them with :meth:`EGSPOConfig.model_config`,
:meth:`EGSPOConfig.rollout_sampler` and :meth:`EGSPOConfig.eval_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import logging
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message says which and why."""


def _f(default: Any, help: str, legacy: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field with help text (mutable defaults go through ``default_factory``); ``legacy`` is
    its ``section.field`` name in egspo 0.1 configs."""
    metadata = {"help": help, **({"legacy": legacy} if legacy else {})}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def _literal_choices(cls: type, name: str) -> tuple[Any, ...]:
    tp, _ = _unwrap_optional(typing.get_type_hints(cls)[name])
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def _check_choices(obj: Any) -> None:
    """Every ``Literal``-typed field of a config dataclass holds one of its choices."""
    for f in dataclasses.fields(obj):
        choices = _literal_choices(type(obj), f.name)
        value = getattr(obj, f.name)
        if choices and value is not None and value not in choices:
            raise ConfigError(f"{f.name}={value!r} is not one of {', '.join(map(repr, choices))}.")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r} must be {bound}.")


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
ComputeDtype = Literal["bfloat16", "float16", "float32"]
QuantType = Literal["nf4", "fp4"]
RolloutCache = Literal["none", "prefix", "dual"]
Remasking = Literal["low_confidence", "random"]
Algorithm = Literal["egspo_sa", "egspo", "diffu_grpo"]
StepSelection = Literal["high_entropy", "random", "uniform", "adaptive"]

#: Rollout KV-cache modes: ``none`` is exact; ``prefix`` and ``dual`` are approximate (Fast-dLLM).
ROLLOUT_CACHES: tuple[str, ...] = typing.get_args(RolloutCache)
ALGORITHMS: tuple[str, ...] = typing.get_args(Algorithm)
STEP_SELECTIONS: tuple[str, ...] = typing.get_args(StepSelection)
TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "clearml", "aim", "dvclive", "swanlab", "all")


# ---------------------------------------------------------------------------------------------------
# Component parameters


@dataclass
class ModelConfig:
    """Which model to load and how to adapt it (the loader's and LoRA wiring's parameters)."""

    name_or_path: str = "builtin:sudoku-tiny"
    dtype: Dtype = "auto"
    trust_remote_code: bool = False
    lora: bool = True
    lora_r: int = 128
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    gradient_checkpointing: bool = False
    #: bitsandbytes quantisation of the base weights at load (egspo[qlora]); LoRA trains on top.
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: QuantType = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: ComputeDtype = "bfloat16"

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model_name_or_path is empty: give a local directory or a hub model name.")
        _check_choices(self)
        _positive("lora_r", self.lora_r)
        _positive("lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout={self.lora_dropout} must be in [0, 1).")


def check_sampler_settings(gen_length: int, block_length: int, steps: int, temperature: float,
                           names: tuple[str, str, str, str] = ("gen_length", "block_length", "steps", "temperature")
                           ) -> None:
    """The block sampler's rules, with the caller's names for the four settings in the messages."""
    gen, block, steps_name, temp = names
    _positive(gen, gen_length)
    _positive(block, block_length)
    _positive(steps_name, steps)
    _positive(temp, temperature, allow_zero=True)
    if gen_length % block_length:
        raise ConfigError(
            f"{gen}={gen_length} is not a multiple of {block}={block_length}: choose a block length that "
            "divides the completion length."
        )
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ConfigError(
            f"{steps_name}={steps} is not a multiple of the number of blocks ({num_blocks} = {gen}/{block}): "
            f"choose a step count divisible by {num_blocks}."
        )
    if steps > gen_length:
        raise ConfigError(
            f"{steps_name}={steps} exceeds {gen}={gen_length}: every step must commit at least one token, so use "
            f"at most {gen_length} steps."
        )


@dataclass
class SamplerConfig:
    """The block low-confidence sampler (docs/algorithm.md#the-diffusion-mdp-and-the-block-sampler)."""

    gen_length: int = 256
    block_length: int = 32
    steps: int = 128
    temperature: float = 0.9
    remasking: Remasking = "low_confidence"
    #: Stop decoding further blocks of rows whose completion has ended.
    stop_at_eos: bool = False
    #: Rollout KV cache: none (exact), or the approximate prefix / dual modes.
    cache: RolloutCache = "none"
    #: Run the rollout forwards through torch.compile(model, dynamic=False).
    compile: bool = False
    #: Cached modes: remake the cache with an exact forward every N steps inside a block (0: at block starts only).
    cache_refresh: int = 0
    #: A LoRA model's rollout runs on a merged copy of the weights (egspo.models.merged).
    merge_lora: bool = False

    def __post_init__(self) -> None:
        _check_choices(self)
        check_sampler_settings(self.gen_length, self.block_length, self.steps, self.temperature)
        _positive("cache_refresh", self.cache_refresh, allow_zero=True)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


@dataclass
class EvalConfig:
    """Evaluation generation: temperature 0, steps = gen_length x steps_ratio, block 32 (the paper's)."""

    gen_lengths: list[int] = field(default_factory=lambda: [128, 256, 512])
    block_length: int = 32
    steps_ratio: float = 0.5
    temperature: float = 0.0
    batch_size: int = 16
    limit: int | None = None

    def __post_init__(self) -> None:
        check_eval_settings(self.gen_lengths, self.block_length, self.steps_ratio, self.temperature, self.batch_size)

    def sampler_for(self, gen_length: int, stop_at_eos: bool = False) -> SamplerConfig:
        """The evaluation sampler at one completion length."""
        num_blocks = gen_length // self.block_length
        steps = max(num_blocks, round(gen_length * self.steps_ratio / num_blocks) * num_blocks)
        return SamplerConfig(
            gen_length=gen_length, block_length=self.block_length, steps=steps,
            temperature=self.temperature, remasking="low_confidence", stop_at_eos=stop_at_eos,
        )


def check_eval_settings(gen_lengths: list[int], block_length: int, steps_ratio: float, temperature: float,
                        batch_size: int, prefix: str = "") -> None:
    """Evaluation sampler rules; ``prefix`` is how the caller names them (``eval_`` in EGSPOConfig)."""
    lengths = f"{prefix}completion_lengths" if prefix else "gen_lengths"
    if not gen_lengths:
        raise ConfigError(f"{lengths} is empty: give at least one completion length.")
    for length in gen_lengths:
        if length <= 0 or length % block_length:
            raise ConfigError(
                f"{lengths} contains {length}, not a positive multiple of {prefix}block_length={block_length}."
            )
    if not 0 < steps_ratio <= 1:
        raise ConfigError(f"{prefix}{'diffusion_' if prefix else ''}steps_ratio={steps_ratio} must be in (0, 1].")
    _positive("per_device_eval_batch_size" if prefix else "batch_size", batch_size)
    _positive(f"{prefix}temperature", temperature, allow_zero=True)


# ---------------------------------------------------------------------------------------------------
# The run configuration


#: Options each algorithm does not use, checked in EGSPOConfig.__post_init__ (set away from the default: warned).
_UNUSED_BY = {
    "diffu_grpo": ("step_selection", "num_selected_steps", "adaptive_alpha", "stop_at_last_content",
                   "importance_weight_cap",
                   "step_selection_as_published",
                   "stepwise_lambda", "normalize_returns", "center_step_term", "step_reward_correctness_only",
                   "kl_estimator", "logp_aggregation", "steps_per_microbatch"),
    "egspo": ("num_iterations", "p_mask_prompt", "normalize_returns", "center_step_term",
              "step_reward_correctness_only"),
    "egspo_sa": ("num_iterations", "p_mask_prompt"),
}


@dataclass
class EGSPOConfig:
    """Every setting of a run (training, generation, evaluation, hub), flat and TRL-named."""

    # -- model ------------------------------------------------------------------------------------
    model_name_or_path: str = _f(
        "builtin:sudoku-tiny",
        "Local directory or hub name of a diffusion LM; 'builtin:sudoku-tiny' is the small Sudoku base model "
        "shipped with egspo, 'builtin:tiny' a random-init tiny model. EGSPOTrainer(model=...) overrides it.",
        legacy="model.name_or_path",
    )
    dtype: Dtype = _f("auto", "Weights dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.",
                      legacy="model.dtype")
    trust_remote_code: bool = _f(
        False, "Load the checkpoint's own modeling code (only for architectures egspo does not ship).",
        legacy="model.trust_remote_code")
    use_peft: bool = _f(
        True, "Train a LoRA adapter (reference policy = adapter disabled); false = full fine-tuning.",
        legacy="model.lora")
    lora_r: int = _f(128, "LoRA rank.", legacy="model.lora_r")
    lora_alpha: int = _f(64, "LoRA alpha.", legacy="model.lora_alpha")
    lora_dropout: float = _f(
        0.0, "LoRA dropout. 0 by default in RL: with dropout the rollout (eval mode) and the update (train mode) "
        "see different policies, so the ratio is not 1 at the first update.", legacy="model.lora_dropout")
    lora_target_modules: list[str] | None = _f(
        None, "Linear layers to adapt; default: all linear layers of the architecture (LLaDA/Dream names); "
        "['all-linear'] for peft's choice; ['published'] for the published EGSPO/d1 list (q, k, v, up on LLaDA).",
        legacy="model.lora_target_modules")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.",
                                      legacy="model.gradient_checkpointing")
    load_in_4bit: bool = _f(
        False, "QLoRA: load the base weights quantised to 4 bits by bitsandbytes (pip install 'egspo[qlora]'; CUDA "
        "only; needs use_peft=true). The LoRA adapter trains on top; the reference is the adapter-disabled 4-bit "
        "base. See docs/qlora.md.")
    load_in_8bit: bool = _f(
        False, "Load the base weights quantised to 8 bits (bitsandbytes LLM.int8; CUDA only; needs use_peft=true).")
    bnb_4bit_quant_type: QuantType = _f("nf4", "load_in_4bit: the 4-bit data type, nf4 (NormalFloat) or fp4.")
    bnb_4bit_use_double_quant: bool = _f(
        True, "load_in_4bit: also quantise the per-block scales (about 0.4 bits per weight saved).")
    bnb_4bit_compute_dtype: ComputeDtype = _f(
        "bfloat16", "load_in_4bit: the dtype the 4-bit weights are dequantised to for each matrix product.")
    max_memory_gb: float | None = _f(
        None, "Memory budget of one device in GB (2^30 bytes): egspo estimates the peak of a training step before "
        "loading the weights, turns gradient checkpointing on if it is needed to fit, and refuses a budget that "
        "nothing fits (naming the smallest settings that would). See docs/qlora.md#memory-planner.")

    # -- rollout generation -----------------------------------------------------------------------
    max_completion_length: int = _f(256, "Completion length L_c in tokens.", legacy="sampler.gen_length")
    block_length: int = _f(32, "Semi-autoregressive block length; max_completion_length must be a multiple of it.",
                           legacy="sampler.block_length")
    diffusion_steps: int = _f(128, "Denoising steps T over the whole completion; a multiple of the number of blocks.",
                              legacy="sampler.steps")
    temperature: float = _f(0.9, "Rollout sampling temperature (0 = greedy argmax).", legacy="sampler.temperature")
    remasking: Remasking = _f("low_confidence", "Which masked positions to commit: low_confidence or random.",
                              legacy="sampler.remasking")
    stop_at_eos: bool = _f(
        False, "Stop decoding further blocks of rows whose completion has ended (remaining positions are committed "
        "as the end token in the next block's steps).", legacy="sampler.stop_at_eos")
    rollout_cache: RolloutCache = _f(
        "none",
        "Rollout KV cache: none (exact, the default), or prefix / dual, which are APPROXIMATE (Fast-dLLM style): one "
        "full forward per block caches every layer's keys/values and the block's other steps run only part of the "
        "sequence against it; the trainer recomputes the selected steps' old log-probs exactly. Needs the native "
        "LLaDA/Dream models.", legacy="sampler.cache")
    importance_weight_cap: float = _f(
        2.0, "Cached rollouts: the truncated importance weight min(exp(logp_exact - logp_rollout), cap) that "
        "multiplies each selected step's loss (docs/algorithm.md#approximate-rollouts); 0 switches the weight off.")
    rollout_cache_refresh: int = _f(
        0, "Cached rollouts: remake the KV cache with an exact forward every N denoising steps inside a block (0: "
        "only at each block's first step). Smaller N: closer to the exact rollout, slower "
        "(docs/algorithm.md#approximate-rollouts).")
    compile_rollout: bool = _f(
        False, "Run the rollout forwards through torch.compile(model, dynamic=False), compiled once per shape.",
        legacy="sampler.compile")
    merge_lora_rollout: bool = _f(
        True, "With LoRA, roll out on a merged copy of the weights (W + s*B*A, refreshed after every optimizer step; "
        "the training weights untouched): the rollout costs what the base model costs, for one extra copy of the "
        "adapted weights. Not applied to quantised or sharded models (docs/algorithm.md#merged-lora-rollouts).")

    # -- algorithm --------------------------------------------------------------------------------
    algorithm: Algorithm = _f(
        "egspo_sa", "egspo_sa (stepwise advantages, lambda 0.5), egspo (lambda 0) or diffu_grpo (the d1 baseline).",
        legacy="rl.algorithm")
    num_generations: int = _f(8, "Rollouts per prompt G (the group for the baseline).", legacy="rl.num_generations")
    step_selection: StepSelection = _f(
        "high_entropy", "Which denoising steps to train on: high_entropy, random, uniform or adaptive.",
        legacy="rl.step_selection")
    num_selected_steps: int | None = _f(
        None, "K selected steps per rollout (the cap K_max for adaptive); default 8 (the paper's), or diffusion_steps "
        "when there are fewer.", legacy="rl.num_selected_steps")
    adaptive_alpha: float = _f(0.7, "adaptive: smallest K_i whose top entropies reach this share of the total.",
                               legacy="rl.adaptive_alpha")
    stop_at_last_content: bool = _f(False, "Only select steps up to the last step that committed a non-end token.",
                                    legacy="rl.stop_at_last_content")
    step_selection_as_published: bool = _f(
        False, "random/uniform ablations as the published code ran them: the same steps for every row, always "
        "including the last step, random ones drawn with replacement (default: per row, distinct, see "
        "docs/algorithm.md).")
    stepwise_lambda: float | None = _f(
        None, "Weight lambda of the stepwise term r - r_hat (default 0.5 for egspo_sa, 0 for egspo).",
        legacy="rl.stepwise_lambda")
    normalize_returns: bool = _f(True, "Divide the return r + lambda*d by (1 + lambda).", legacy="rl.normalize_returns")
    center_step_term: bool = _f(
        True, "Center the whole return over the group (true) or only r, adding lambda*d uncentered (false).",
        legacy="rl.center_step_term")
    scale_rewards: bool = _f(False, "Divide group-centered advantages by the group std.", legacy="rl.scale_rewards")
    step_reward_correctness_only: bool = _f(
        False, "Score greedy completions with the correctness reward functions only.",
        legacy="rl.step_reward_correctness_only")
    epsilon: float = _f(0.2, "Lower clip range of the ratio (1 - epsilon).", legacy="rl.epsilon_low")
    epsilon_high: float = _f(0.5, "Upper clip range of the ratio (1 + epsilon_high); the paper's 0.5.",
                             legacy="rl.epsilon_high")
    beta: float = _f(0.04, "KL coefficient (0 disables the reference model).", legacy="rl.beta")
    kl_estimator: Literal["k3", "exact"] = _f(
        "k3", "k3 (on step log-probs) or exact (full-vocabulary KL at committed positions).", legacy="rl.kl_estimator")
    logp_aggregation: Literal["sum", "mean"] = _f("sum", "Step log-prob over committed tokens: sum or mean.",
                                                  legacy="rl.logp_aggregation")
    steps_per_microbatch: int = _f(1, "Selected steps folded into one micro-batch.", legacy="rl.steps_per_microbatch")
    num_iterations: int = _f(8, "diffu_grpo: optimizer steps mu each rollout batch serves.",
                             legacy="rl.num_iterations")
    p_mask_prompt: float = _f(0.15, "diffu_grpo: probability of masking each prompt token in the estimator.",
                              legacy="rl.p_mask_prompt")

    # -- data and rewards -------------------------------------------------------------------------
    task: str = _f(
        "sudoku", "Built-in task (gsm8k, math500, countdown, sudoku, humaneval, mbpp, kodcode, custom): its data, "
        "prompts, rewards and accuracy. EGSPOTrainer(train_dataset=..., reward_funcs=...) replace its data/rewards.",
        legacy="task.name")
    train_file: str | None = _f(
        None, "Training data (jsonl/json/csv/parquet, a hub dataset name, or builtin:NAME); default: the task's "
        "generator.", legacy="task.train_file")
    eval_file: str | None = _f(None, "Evaluation data; default: the task's generator (held-out seed).",
                               legacy="task.eval_file")
    num_train: int = _f(2000, "Number of generated training problems (generator tasks only).", legacy="task.num_train")
    num_eval: int = _f(200, "Number of generated evaluation problems (generator tasks only).", legacy="task.num_eval")
    task_options: dict[str, Any] = _f({}, "Task-specific options, e.g. {blanks: 6} for sudoku.",
                                      legacy="task.options")
    max_prompt_length: int = _f(200, "Prompts longer than this many tokens are left-truncated (with a warning).",
                                legacy="task.max_prompt_length")
    reward_funcs: list[str] = _f(
        [], "Additional reward functions as 'module:function' import paths (the working directory is importable).",
        legacy="task.extra_reward_funcs")
    reward_weights: list[float] | None = _f(
        None, "Weights of all reward functions (the task's or the trainer's, then reward_funcs); default: the task's "
        "own, 1.0 for the others.", legacy="task.reward_weights")

    # -- training ---------------------------------------------------------------------------------
    output_dir: str = _f("runs/egspo", "Run directory: checkpoints, metrics.jsonl, config.yaml, report.",
                         legacy="train.output_dir")
    seed: int = _f(42, "Seed of every random generator in the run.", legacy="train.seed")
    max_steps: int = _f(100, "Training steps: rollout batches (RL) or optimizer steps (SFT).", legacy="train.max_steps")
    per_device_train_batch_size: int = _f(
        8, "Rollouts per device per step (RL) or examples per micro-batch (SFT).", legacy="train.per_device_batch_size")
    gradient_accumulation_steps: int = _f(2, "Micro-batches per optimizer step.",
                                          legacy="train.gradient_accumulation_steps")
    learning_rate: float = _f(3e-5, "AdamW learning rate.", legacy="train.learning_rate")
    adam_beta1: float = _f(0.9, "AdamW beta1.", legacy="train.adam_beta1")
    adam_beta2: float = _f(0.99, "AdamW beta2.", legacy="train.adam_beta2")
    weight_decay: float = _f(0.1, "AdamW weight decay.", legacy="train.weight_decay")
    max_grad_norm: float = _f(0.2, "Gradient-norm clip (0 disables).", legacy="train.max_grad_norm")
    warmup_steps: int = _f(0, "Linear warm-up of the learning rate, in optimizer steps.", legacy="train.warmup_steps")
    lr_scheduler_type: Literal["constant", "cosine"] = _f("constant", "constant or cosine (after warm-up).",
                                                          legacy="train.lr_scheduler")
    bf16: bool | None = _f(None, "bf16 mixed precision; default (null): on with a GPU, off on CPU.",
                           legacy="train.mixed_precision")
    save_steps: int = _f(200, "Checkpoint every N steps (and always at the end); 0 = only at the end.",
                         legacy="train.save_every")
    save_total_limit: int = _f(3, "Checkpoints kept; older ones are deleted.", legacy="train.keep_last")
    logging_steps: int = _f(1, "Write metrics every N steps.", legacy="train.log_every")
    report_to: list[str] = _f([], f"Trackers through accelerate: {', '.join(TRACKERS)}.", legacy="train.report_to")

    # -- evaluation -------------------------------------------------------------------------------
    eval_strategy: Literal["no", "steps"] = _f(
        "no", "'steps': evaluate every eval_steps steps (greedy, the eval settings) on the eval data.")
    eval_steps: int | None = _f(None, "Evaluate every N steps (eval_strategy=steps); default: save_steps.")
    load_best_model_at_end: bool = _f(
        False, "At the end, load the checkpoint with the best eval accuracy (needs eval_strategy=steps).")
    eval_completion_lengths: list[int] = _f([128, 256, 512], "Completion lengths to evaluate.",
                                            legacy="eval.gen_lengths")
    eval_block_length: int = _f(32, "Block length of the evaluation sampler.", legacy="eval.block_length")
    eval_diffusion_steps_ratio: float = _f(0.5, "Evaluation denoising steps as a fraction of the completion length.",
                                           legacy="eval.steps_ratio")
    eval_temperature: float = _f(0.0, "Evaluation sampling temperature (0 = greedy).", legacy="eval.temperature")
    per_device_eval_batch_size: int = _f(16, "Prompts per evaluation generation batch per process.",
                                         legacy="eval.batch_size")
    eval_limit: int | None = _f(None, "Evaluate only the first N items.", legacy="eval.limit")
    scoring_protocol: Literal["default", "reference"] = _f(
        "default", "Accuracy protocol of evaluations: default (our answer reading; math-verify for MATH500) or "
        "reference (the published d1 parser's decisions); the other is reported beside it (docs/tasks.md).")

    # -- hub --------------------------------------------------------------------------------------
    push_to_hub: bool = _f(False, "Push the final model (adapter or weights, model card) to the hub at the end.")
    hub_model_id: str | None = _f(None, "Hub repository (owner/name); default: the output directory's name.")
    hub_private_repo: bool = _f(False, "Create the hub repository as private.")

    def __post_init__(self) -> None:
        _check_choices(self)
        self.model_config()  # LoRA and dtype rules
        check_sampler_settings(self.max_completion_length, self.block_length, self.diffusion_steps, self.temperature,
                               ("max_completion_length", "block_length", "diffusion_steps", "temperature"))
        check_eval_settings(self.eval_completion_lengths, self.eval_block_length, self.eval_diffusion_steps_ratio,
                            self.eval_temperature, self.per_device_eval_batch_size, prefix="eval_")
        self._check_algorithm()
        self._check_data()
        self._check_training()
        for name in _UNUSED_BY[self.algorithm]:
            resolved = name in ("stepwise_lambda", "num_selected_steps") and self._resolved_default(name)
            if getattr(self, name) != _DEFAULTS[name] and not resolved:
                warnings.warn(
                    f"{name}={getattr(self, name)!r} has no effect with algorithm={self.algorithm!r}.",
                    UserWarning, stacklevel=3)

    def _resolved_default(self, name: str) -> bool:
        """Whether an optional field holds the value its None default resolves to."""
        if name == "stepwise_lambda":
            return self.stepwise_lambda == (0.5 if self.algorithm == "egspo_sa" else 0.0)
        return self.num_selected_steps == min(8, self.diffusion_steps)

    def _check_algorithm(self) -> None:
        if self.num_selected_steps is None:
            self.num_selected_steps = min(8, self.diffusion_steps)
        if self.num_generations < 2:
            raise ConfigError(
                f"num_generations={self.num_generations}: a group baseline needs at least 2 rollouts per prompt.")
        for name in ("num_selected_steps", "steps_per_microbatch", "num_iterations"):
            _positive(name, getattr(self, name))
        for name in ("beta", "epsilon", "epsilon_high", "importance_weight_cap", "rollout_cache_refresh"):
            _positive(name, getattr(self, name), allow_zero=True)
        if self.rollout_cache == "none" and self.rollout_cache_refresh:
            warnings.warn(f"rollout_cache_refresh={self.rollout_cache_refresh} has no effect with rollout_cache=none "
                          "(the exact rollout has no cache).", UserWarning, stacklevel=4)
        if not 0 < self.adaptive_alpha <= 1:
            raise ConfigError(f"adaptive_alpha={self.adaptive_alpha} must be in (0, 1].")
        if not 0 <= self.p_mask_prompt < 1:
            raise ConfigError(f"p_mask_prompt={self.p_mask_prompt} must be in [0, 1).")
        if self.num_selected_steps % self.steps_per_microbatch:
            raise ConfigError(
                f"num_selected_steps={self.num_selected_steps} is not a multiple of "
                f"steps_per_microbatch={self.steps_per_microbatch}.")
        if self.stepwise_lambda is None:
            self.stepwise_lambda = 0.5 if self.algorithm == "egspo_sa" else 0.0
        elif self.algorithm == "egspo" and self.stepwise_lambda != 0:
            raise ConfigError(
                f"stepwise_lambda={self.stepwise_lambda} with algorithm=egspo: plain EGSPO has lambda 0; use "
                "algorithm=egspo_sa for stepwise advantages.")
        elif self.stepwise_lambda < 0:
            raise ConfigError(f"stepwise_lambda={self.stepwise_lambda} must be >= 0.")
        if self.algorithm != "diffu_grpo" and self.num_selected_steps > self.diffusion_steps:
            raise ConfigError(
                f"num_selected_steps={self.num_selected_steps} exceeds diffusion_steps={self.diffusion_steps}: K "
                "selected steps must be at most the number of denoising steps.")

    def _check_data(self) -> None:
        for name in ("num_train", "num_eval", "max_prompt_length"):
            _positive(name, getattr(self, name))
        for spec in self.reward_funcs:
            if ":" not in spec:
                raise ConfigError(
                    f"reward_funcs entry {spec!r} is not 'module:function' (e.g. 'my_rewards:length_penalty').")

    def _check_training(self) -> None:
        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                     "save_total_limit", "logging_steps"):
            _positive(name, getattr(self, name))
        for name in ("weight_decay", "max_grad_norm", "warmup_steps", "save_steps"):
            _positive(name, getattr(self, name), allow_zero=True)
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError("adam_beta1 and adam_beta2 must be in [0, 1).")
        if self.report_to == ["none"]:  # TRL's spelling of no tracker
            self.report_to = []
        for tracker in self.report_to:
            if tracker not in TRACKERS:
                raise ConfigError(f"report_to entry {tracker!r} is not one of {', '.join(TRACKERS)} (or none).")
        if self.eval_steps is not None:
            _positive("eval_steps", self.eval_steps)
        if self.load_best_model_at_end and self.eval_strategy == "no":
            raise ConfigError("load_best_model_at_end=true needs eval_strategy=steps (something to choose by).")

    # -- derived parameters -----------------------------------------------------------------------

    def model_config(self, name_or_path: str | None = None) -> ModelConfig:
        """The loader's parameters (``name_or_path`` overrides ``model_name_or_path``)."""
        return ModelConfig(
            name_or_path=name_or_path or self.model_name_or_path, dtype=self.dtype,
            trust_remote_code=self.trust_remote_code, lora=self.use_peft, lora_r=self.lora_r,
            lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout, lora_target_modules=self.lora_target_modules,
            gradient_checkpointing=self.gradient_checkpointing, load_in_4bit=self.load_in_4bit,
            load_in_8bit=self.load_in_8bit, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=self.bnb_4bit_compute_dtype,
        )

    def rollout_sampler(self) -> SamplerConfig:
        """The sampler of the training rollouts."""
        return SamplerConfig(
            gen_length=self.max_completion_length, block_length=self.block_length, steps=self.diffusion_steps,
            temperature=self.temperature, remasking=self.remasking, stop_at_eos=self.stop_at_eos,
            cache=self.rollout_cache, compile=self.compile_rollout, cache_refresh=self.rollout_cache_refresh,
            merge_lora=self.merge_lora_rollout and self.use_peft,
        )

    def eval_config(self) -> EvalConfig:
        """The evaluation generation settings."""
        return EvalConfig(
            gen_lengths=list(self.eval_completion_lengths), block_length=self.eval_block_length,
            steps_ratio=self.eval_diffusion_steps_ratio, temperature=self.eval_temperature,
            batch_size=self.per_device_eval_batch_size, limit=self.eval_limit,
        )

    @property
    def updates_per_rollout(self) -> int:
        """Micro-batches (backward passes) one rollout batch feeds."""
        if self.algorithm == "diffu_grpo":
            return self.num_iterations * self.gradient_accumulation_steps
        return cast(int, self.num_selected_steps) // self.steps_per_microbatch  # resolved in __post_init__

    def validate(self, num_processes: int | None = None) -> None:
        """The rules that need the launch size (checked by the trainer at start-up: a recipe for 8 GPUs with 6
        rollouts per device and G = 8 must still load in one process, e.g. for ``egspo eval``)."""
        if num_processes is None:
            return
        global_batch = self.per_device_train_batch_size * num_processes
        if global_batch % self.num_generations:
            raise ConfigError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} x {num_processes} process(es) = "
                f"{global_batch} rollouts is not a multiple of num_generations={self.num_generations}: every "
                "prompt's group must be complete in a global batch. Launch a multiple of "
                f"{self.num_generations // math.gcd(self.per_device_train_batch_size, self.num_generations)} "
                "processes or change per_device_train_batch_size.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: Deprecated alias (egspo 0.1): the run configuration.
Config = EGSPOConfig
_dataclass_init = EGSPOConfig.__init__


@functools.wraps(_dataclass_init)
def _init_naming_unknown_fields(self: EGSPOConfig, *args: Any, **kwargs: Any) -> None:
    for key in kwargs:
        if key not in _FIELDS:
            raise _unknown_key(key)
    _dataclass_init(self, *args, **kwargs)


EGSPOConfig.__init__ = _init_naming_unknown_fields  # type: ignore[method-assign]

_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(EGSPOConfig)}
_DEFAULTS: dict[str, Any] = {
    f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    for f in dataclasses.fields(EGSPOConfig)
}
#: ``section.field`` of egspo 0.1 -> the flat field.
LEGACY_NAMES: dict[str, str] = {f.metadata["legacy"]: f.name for f in _FIELDS.values() if "legacy" in f.metadata}
LEGACY_SECTIONS = ("model", "sampler", "rl", "task", "train", "eval")
_MIXED_PRECISION = {"auto": None, "no": False, "bf16": True}


def field_help(name: str) -> str:
    """The help text of an EGSPOConfig field."""
    return str(_FIELDS[name].metadata["help"])


# ---------------------------------------------------------------------------------------------------
# Loading, overrides, saving


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


#: The words YAML 1.1 reads as each boolean.
_YAML_BOOL_WORDS = {False: ("no", "false", "off", "n"), True: ("yes", "true", "on", "y")}


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Check/convert one YAML value against a field type; raise ConfigError naming ``where``."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} may not be null.")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads no/off/yes/on as booleans: `eval_strategy: no` means "no"
            words = _YAML_BOOL_WORDS[value]
            value = next((choice for choice in choices if isinstance(choice, str) and choice.lower() in words), value)
        if value not in choices:
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(map(repr, choices))}.")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            items = str(value).split(",") if isinstance(value, str) else [value]
            value = [yaml.safe_load(v) if isinstance(v, str) else v for v in items if v != ""]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        return [_coerce(f"{where}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}.")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}.")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} must be a string, got {value!r}.")
    return value


def _unknown_key(key: str) -> ConfigError:
    # an egspo 0.1 field name without its section first (gen_length -> max_completion_length)
    close = [new for old, new in LEGACY_NAMES.items() if old.split(".", 1)[1] == key and new != key][:1]
    close = close or difflib.get_close_matches(key, list(_FIELDS), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]}?" if close else " Run `egspo config --help-fields` for the list."
    return ConfigError(f"Unknown config key {key!r}.{hint}")


def _deprecated(renames: dict[str, str], where: str) -> None:
    listed = ", ".join(f"{old} -> {new}" for old, new in renames.items())
    warnings.warn(f"{where} uses the sectioned config names of egspo 0.1, which work until egspo 0.3; the new names: "
                  f"{listed}.", FutureWarning, stacklevel=4)


def _legacy(section: str, name: str, value: Any) -> tuple[str, Any]:
    """The flat (field, value) of a ``section.field`` key of egspo 0.1."""
    old = f"{section}.{name}"
    if old not in LEGACY_NAMES:
        candidates = [key for key in LEGACY_NAMES if key.endswith(f".{name}")]
        if candidates:
            raise ConfigError(f"Unknown config key {old!r}: {name!r} belonged to {candidates[0]!r}, now "
                              f"{LEGACY_NAMES[candidates[0]]!r}.")
        raise _unknown_key(name)
    new = LEGACY_NAMES[old]
    if old == "train.mixed_precision":
        if value not in _MIXED_PRECISION:
            raise ConfigError(f"{old}={value!r} is not one of auto, no, bf16 (now bf16: null/false/true).")
        value = _MIXED_PRECISION[value]
    return new, value


def flatten(data: Any, source: str = "the config") -> dict[str, Any]:
    """A flat ``{field: value}`` mapping from a YAML document, legacy sections unfolded (warned)."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source} must be a mapping of field: value (e.g. 'max_steps: 10'), got a {type(data).__name__}.")
    flat: dict[str, Any] = {}
    renames: dict[str, str] = {}
    for key, value in data.items():
        key = str(key)
        if key in LEGACY_SECTIONS and (isinstance(value, dict) or key not in _FIELDS):
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"Section {key!r} in {source} must be a mapping of field: value, got {value!r}.")
            for name, item in value.items():
                new, item = _legacy(key, str(name), item)
                flat[new] = item
                renames[f"{key}.{name}"] = new
        else:
            flat[key] = value
    if renames:
        _deprecated(renames, source)
    return flat


def parse_override(item: str) -> tuple[str, Any]:
    """``field=value`` (value parsed as YAML) -> (field, value); ``section.field=value`` is legacy (warned)."""
    if "=" not in item:
        raise ConfigError(f"Override {item!r} is not of the form field=value (e.g. beta=0.0).")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Override {item!r}: the value is not valid YAML ({exc}).") from exc
    if "." in key:
        section, _, name = key.partition(".")
        if section not in LEGACY_SECTIONS:
            raise ConfigError(f"Override key {key!r}: use the flat field name, e.g. max_steps=10.")
        new, value = _legacy(section, name, value)
        _deprecated({key: new}, f"Override {item!r}")
        return new, value
    return key, value


def config_from_dict(data: dict[str, Any], where: dict[str, str] | None = None) -> EGSPOConfig:
    """Build and validate an EGSPOConfig from a flat mapping; ``where`` says where each key came from
    (file and line, or the command-line override), for the error messages."""
    where = where or {}
    hints = typing.get_type_hints(EGSPOConfig)
    kwargs = {}
    for key, value in flatten(data).items():
        if key not in _FIELDS:
            exc = _unknown_key(key)
            raise ConfigError(f"{exc}{_origin(where, key)}") from None
        try:
            kwargs[key] = _coerce(key, value, hints[key])
        except ConfigError as exc:
            raise ConfigError(f"{exc}{_origin(where, key)}") from None
    try:
        return EGSPOConfig(**kwargs)
    except ConfigError as exc:
        culprit = next((key for key in where if str(exc).startswith(f"{key}=") or f" {key}=" in str(exc)), None)
        raise ConfigError(f"{exc}{_origin(where, culprit) if culprit else ''}") from None


def _origin(where: dict[str, str], key: str) -> str:
    return f" ({where[key]})" if key in where else ""


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The flat mapping of a YAML config and, per key, ``path:line``."""
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}, {}
    flat = flatten(data, source=f"Config file {path}")
    lines: dict[str, str] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(value_node, yaml.MappingNode) and key_node.value in LEGACY_SECTIONS:
                for inner_key, _ in value_node.value:
                    name = LEGACY_NAMES.get(f"{key_node.value}.{inner_key.value}")
                    if name:
                        lines[name] = f"{path}:{inner_key.start_mark.line + 1}"
            else:
                lines[str(key_node.value)] = f"{path}:{key_node.start_mark.line + 1}"
    return flat, lines


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> EGSPOConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply ``field=value`` overrides."""
    data: dict[str, Any] = {}
    where: dict[str, str] = {}
    if path is not None:
        data, where = _read_yaml(Path(path))
    for item in overrides or []:
        key, value = parse_override(item)
        data[key] = value
        where[key] = f"command-line override {item!r}"
    return config_from_dict(data, where)


def save_config(cfg: EGSPOConfig, path: str | Path) -> None:
    """Write the resolved config as flat YAML (re-loadable with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
