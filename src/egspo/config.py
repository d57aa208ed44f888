"""Typed run configuration: dataclasses, YAML loading, ``section.field=value`` overrides, validation.

A :class:`Config` is the single source of truth of a run. Every field carries its help text in
``metadata["help"]``; each section's ``__post_init__`` rejects inconsistent settings with a sentence
that names the field and says what to change, and :meth:`Config.validate` checks the rules that span
sections. Unknown keys are errors.

    cfg = load_config("configs/tiny_sudoku.yaml", ["rl.beta=0.0", "train.max_steps=10"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message says which and why."""


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text (mutable defaults go through ``default_factory``)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def _choice(section: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{name}={value!r} is not one of {', '.join(map(repr, choices))}.")


def _positive(section: str, name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{section}.{name}={value!r} must be {bound}.")


@dataclass
class ModelConfig:
    """Which model to load and how to adapt it."""

    name_or_path: str = _f(
        "builtin:sudoku-tiny",
        "Local directory or hub name of a diffusion LM; 'builtin:sudoku-tiny' is the small Sudoku base "
        "model shipped with egspo, 'builtin:tiny' a random-init tiny model.",
    )
    dtype: str = _f("auto", "Weights dtype: auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16.")
    trust_remote_code: bool = _f(
        False, "Load the checkpoint's own modeling code (only for architectures egspo does not ship)."
    )
    lora: bool = _f(True, "Train a LoRA adapter (reference policy = adapter disabled); false = full fine-tuning.")
    lora_r: int = _f(128, "LoRA rank.")
    lora_alpha: int = _f(64, "LoRA alpha.")
    lora_dropout: float = _f(0.05, "LoRA dropout.")
    lora_target_modules: list[str] | None = _f(
        None, "Linear layers to adapt; default: all linear layers of the architecture (LLaDA/Dream names)."
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path is empty: give a local directory or a hub model name.")
        _choice("model", "dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _positive("model", "lora_r", self.lora_r)
        _positive("model", "lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"model.lora_dropout={self.lora_dropout} must be in [0, 1).")


#: Rollout KV-cache modes: ``none`` is exact; ``prefix`` and ``dual`` are approximate (Fast-dLLM).
ROLLOUT_CACHES = ("none", "prefix", "dual")


@dataclass
class SamplerConfig:
    """The block low-confidence sampler of SPEC §1 (used for rollouts)."""

    gen_length: int = _f(256, "Completion length L_c in tokens.")
    block_length: int = _f(32, "Semi-autoregressive block length; gen_length must be a multiple of it.")
    steps: int = _f(128, "Denoising steps T over the whole completion; a multiple of the number of blocks.")
    temperature: float = _f(0.9, "Sampling temperature for candidate tokens (0 = greedy argmax).")
    remasking: str = _f("low_confidence", "Which masked positions to commit: low_confidence or random.")
    stop_at_eos: bool = _f(
        False,
        "Stop decoding further blocks of rows whose completion has ended (remaining positions are "
        "committed as the end token in the next block's steps).",
    )
    cache: str = _f(
        "none",
        "Rollout KV cache: none (exact, the default), or prefix / dual, which are APPROXIMATE (Fast-dLLM "
        "style): one full forward per block caches every layer's keys/values, and the block's other steps "
        "run only [block start, end) (prefix) or only the block (dual) against that cache, so the log-probs "
        "they record are not the exact model's (the trainer recomputes the selected steps' old log-probs "
        "exactly). Needs the native LLaDA/Dream models.",
    )
    compile: bool = _f(
        False,
        "Run the rollout forwards through torch.compile(model, dynamic=False), compiled once per shape "
        "and kept on the DiffusionLM (works with a peft-wrapped model).",
    )

    def __post_init__(self) -> None:
        _positive("sampler", "gen_length", self.gen_length)
        _positive("sampler", "block_length", self.block_length)
        _positive("sampler", "steps", self.steps)
        _positive("sampler", "temperature", self.temperature, allow_zero=True)
        _choice("sampler", "remasking", self.remasking, ("low_confidence", "random"))
        _choice("sampler", "cache", self.cache, ROLLOUT_CACHES)
        if self.gen_length % self.block_length:
            raise ConfigError(
                f"sampler.gen_length={self.gen_length} is not a multiple of sampler.block_length="
                f"{self.block_length}: choose a block length that divides the completion length."
            )
        if self.steps % self.num_blocks:
            raise ConfigError(
                f"sampler.steps={self.steps} is not a multiple of the number of blocks ({self.num_blocks} = "
                f"gen_length/block_length): choose steps divisible by {self.num_blocks}."
            )
        if self.steps > self.gen_length:
            raise ConfigError(
                f"sampler.steps={self.steps} exceeds sampler.gen_length={self.gen_length}: every step must "
                "commit at least one token, so use at most gen_length steps."
            )

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


ALGORITHMS = ("egspo_sa", "egspo", "diffu_grpo")
STEP_SELECTIONS = ("high_entropy", "random", "uniform", "adaptive")


@dataclass
class RLConfig:
    """The RL objective: EGSPO-SA (SPEC §2-4) or diffu-GRPO (SPEC §5)."""

    algorithm: str = _f(
        "egspo_sa",
        "egspo_sa (stepwise advantages, lambda 0.5), egspo (lambda 0) or diffu_grpo (the d1 baseline).",
    )
    num_generations: int = _f(8, "Rollouts per prompt G (the group for the baseline).")
    step_selection: str = _f(
        "high_entropy", "Which denoising steps to train on: high_entropy, random, uniform or adaptive."
    )
    num_selected_steps: int = _f(8, "K selected steps per rollout (the cap K_max for adaptive).")
    adaptive_alpha: float = _f(0.7, "adaptive: smallest K_i whose top entropies reach this share of the total.")
    stop_at_last_content: bool = _f(
        False, "Only select steps up to the last step that committed a non-end token."
    )
    stepwise_lambda: float | None = _f(
        None, "Weight lambda of the stepwise term r - r_hat (default 0.5 for egspo_sa, 0 for egspo)."
    )
    normalize_returns: bool = _f(True, "Divide the return r + lambda*d by (1 + lambda).")
    center_step_term: bool = _f(
        True, "Center the whole return over the group (true) or only r, adding lambda*d uncentered (false)."
    )
    scale_rewards: bool = _f(False, "Divide group-centered advantages by the group std.")
    step_reward_correctness_only: bool = _f(
        False, "Score greedy completions with the correctness reward functions only."
    )
    epsilon_low: float = _f(0.2, "Lower clip range of the ratio.")
    epsilon_high: float = _f(0.5, "Upper clip range of the ratio.")
    beta: float = _f(0.04, "KL coefficient (0 disables the reference model).")
    kl_estimator: str = _f("k3", "k3 (on step log-probs) or exact (full-vocabulary KL at committed positions).")
    logp_aggregation: str = _f("sum", "Step log-prob over committed tokens: sum or mean.")
    steps_per_microbatch: int = _f(1, "Selected steps folded into one micro-batch.")
    num_iterations: int = _f(8, "diffu_grpo: passes mu over each rollout batch.")
    p_mask_prompt: float = _f(0.15, "diffu_grpo: probability of masking each prompt token in the estimator.")

    def __post_init__(self) -> None:
        _choice("rl", "algorithm", self.algorithm, ALGORITHMS)
        _choice("rl", "step_selection", self.step_selection, STEP_SELECTIONS)
        _choice("rl", "kl_estimator", self.kl_estimator, ("k3", "exact"))
        _choice("rl", "logp_aggregation", self.logp_aggregation, ("sum", "mean"))
        if self.num_generations < 2:
            raise ConfigError(
                f"rl.num_generations={self.num_generations}: a group baseline needs at least 2 rollouts per prompt."
            )
        _positive("rl", "num_selected_steps", self.num_selected_steps)
        _positive("rl", "steps_per_microbatch", self.steps_per_microbatch)
        _positive("rl", "num_iterations", self.num_iterations)
        _positive("rl", "beta", self.beta, allow_zero=True)
        _positive("rl", "epsilon_low", self.epsilon_low, allow_zero=True)
        _positive("rl", "epsilon_high", self.epsilon_high, allow_zero=True)
        if not 0 < self.adaptive_alpha <= 1:
            raise ConfigError(f"rl.adaptive_alpha={self.adaptive_alpha} must be in (0, 1].")
        if not 0 <= self.p_mask_prompt < 1:
            raise ConfigError(f"rl.p_mask_prompt={self.p_mask_prompt} must be in [0, 1).")
        if self.num_selected_steps % self.steps_per_microbatch:
            raise ConfigError(
                f"rl.num_selected_steps={self.num_selected_steps} is not a multiple of rl.steps_per_microbatch="
                f"{self.steps_per_microbatch}."
            )
        if self.stepwise_lambda is None:
            self.stepwise_lambda = 0.5 if self.algorithm == "egspo_sa" else 0.0
        elif self.algorithm == "egspo" and self.stepwise_lambda != 0:
            raise ConfigError(
                f"rl.stepwise_lambda={self.stepwise_lambda} with rl.algorithm=egspo: plain EGSPO has lambda 0; "
                "use rl.algorithm=egspo_sa for stepwise advantages."
            )
        elif self.stepwise_lambda < 0:
            raise ConfigError(f"rl.stepwise_lambda={self.stepwise_lambda} must be >= 0.")


@dataclass
class TaskConfig:
    """What to train on: a built-in task (data file or generator) plus optional extra reward functions."""

    name: str = _f("sudoku", "gsm8k, math500, countdown, sudoku, humaneval, mbpp or kodcode.")
    train_file: str | None = _f(
        None, "Training data (jsonl/json/csv/parquet) or hub dataset name; default: the task's generator."
    )
    eval_file: str | None = _f(None, "Evaluation data; default: the task's generator (held-out seed).")
    num_train: int = _f(2000, "Number of generated training problems (generator tasks only).")
    num_eval: int = _f(200, "Number of generated evaluation problems (generator tasks only).")
    options: dict[str, Any] = _f({}, "Task-specific options, e.g. {blanks: 6} for sudoku.")
    max_prompt_length: int = _f(200, "Prompts longer than this many tokens are left-truncated (with a warning).")
    extra_reward_funcs: list[str] = _f([], "Additional reward functions as 'module:function' import paths.")
    reward_weights: list[float] | None = _f(
        None, "Weights of all reward functions (task's, then extra); default: the task's own, 1.0 for extras."
    )

    def __post_init__(self) -> None:
        _positive("task", "num_train", self.num_train)
        _positive("task", "num_eval", self.num_eval)
        _positive("task", "max_prompt_length", self.max_prompt_length)
        for spec in self.extra_reward_funcs:
            if ":" not in spec:
                raise ConfigError(
                    f"task.extra_reward_funcs entry {spec!r} is not 'module:function' (e.g. 'my_rewards:length_penalty')."
                )


@dataclass
class TrainConfig:
    """Optimisation, batching, checkpointing and logging (shared by `egspo train` and `egspo sft`)."""

    output_dir: str = _f("runs/egspo", "Run directory: checkpoints, metrics.jsonl, config.yaml.")
    seed: int = _f(42, "Seed of every random generator in the run.")
    max_steps: int = _f(100, "Number of rollout batches (RL) or optimizer steps (SFT).")
    per_device_batch_size: int = _f(8, "Rollouts per device per step (RL) or examples per micro-batch (SFT).")
    gradient_accumulation_steps: int = _f(2, "Micro-batches per optimizer step.")
    learning_rate: float = _f(3e-5, "AdamW learning rate.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.99, "AdamW beta2.")
    weight_decay: float = _f(0.1, "AdamW weight decay.")
    max_grad_norm: float = _f(0.2, "Gradient-norm clip (0 disables).")
    warmup_steps: int = _f(0, "Linear warm-up of the learning rate, in optimizer steps.")
    lr_scheduler: str = _f("constant", "constant or cosine (after warm-up).")
    mixed_precision: str = _f("auto", "auto (bf16 on GPU, none on CPU), no or bf16.")
    save_every: int = _f(200, "Checkpoint every N steps (and always at the end); 0 = only at the end.")
    keep_last: int = _f(3, "Checkpoints kept; older ones are deleted.")
    log_every: int = _f(1, "Write metrics every N steps.")
    report_to: list[str] = _f([], "Extra trackers through accelerate: tensorboard and/or wandb.")

    def __post_init__(self) -> None:
        for name in ("max_steps", "per_device_batch_size", "gradient_accumulation_steps", "learning_rate",
                     "keep_last", "log_every"):
            _positive("train", name, getattr(self, name))
        for name in ("weight_decay", "max_grad_norm", "warmup_steps", "save_every"):
            _positive("train", name, getattr(self, name), allow_zero=True)
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ConfigError("train.adam_beta1 and train.adam_beta2 must be in [0, 1).")
        _choice("train", "lr_scheduler", self.lr_scheduler, ("constant", "cosine"))
        _choice("train", "mixed_precision", self.mixed_precision, ("auto", "no", "bf16"))
        for tracker in self.report_to:
            _choice("train", "report_to", tracker, ("tensorboard", "wandb"))


@dataclass
class EvalConfig:
    """Evaluation generation (SPEC §6: temperature 0, steps = gen_length / 2, block 32)."""

    gen_lengths: list[int] = _f([128, 256, 512], "Completion lengths to evaluate.")
    block_length: int = _f(32, "Block length of the evaluation sampler.")
    steps_ratio: float = _f(0.5, "Denoising steps as a fraction of the completion length.")
    temperature: float = _f(0.0, "Evaluation sampling temperature (0 = greedy).")
    batch_size: int = _f(16, "Prompts per generation batch per process.")
    limit: int | None = _f(None, "Evaluate only the first N items.")

    def __post_init__(self) -> None:
        if not self.gen_lengths:
            raise ConfigError("eval.gen_lengths is empty: give at least one completion length.")
        for length in self.gen_lengths:
            if length % self.block_length:
                raise ConfigError(
                    f"eval.gen_lengths contains {length}, not a multiple of eval.block_length={self.block_length}."
                )
        if not 0 < self.steps_ratio <= 1:
            raise ConfigError(f"eval.steps_ratio={self.steps_ratio} must be in (0, 1].")
        _positive("eval", "batch_size", self.batch_size)
        _positive("eval", "temperature", self.temperature, allow_zero=True)

    def sampler_for(self, gen_length: int, stop_at_eos: bool = False) -> SamplerConfig:
        """The evaluation sampler at one completion length."""
        num_blocks = gen_length // self.block_length
        steps = max(num_blocks, round(gen_length * self.steps_ratio / num_blocks) * num_blocks)
        return SamplerConfig(
            gen_length=gen_length, block_length=self.block_length, steps=steps,
            temperature=self.temperature, remasking="low_confidence", stop_at_eos=stop_at_eos,
        )


@dataclass
class Config:
    """A whole run. Sections: model, sampler, rl, task, train, eval."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, num_processes: int | None = None) -> None:
        """Cross-section rules. The global-batch rule needs the launch size, so it is checked only when
        ``num_processes`` is given: the RL trainer calls ``validate(accelerator.num_processes)`` at start-up.
        (A recipe for 8 GPUs with 6 rollouts per device and G = 8 must load in one process too, e.g.
        for ``egspo eval`` or ``egspo config``.)"""
        if self.rl.algorithm != "diffu_grpo" and self.rl.num_selected_steps > self.sampler.steps:
            raise ConfigError(
                f"rl.num_selected_steps={self.rl.num_selected_steps} exceeds sampler.steps={self.sampler.steps}: "
                "K selected steps must be at most the number of denoising steps."
            )
        if num_processes is None:
            return
        global_batch = self.train.per_device_batch_size * num_processes
        if global_batch % self.rl.num_generations:
            raise ConfigError(
                f"train.per_device_batch_size={self.train.per_device_batch_size} x {num_processes} process(es) = "
                f"{global_batch} rollouts is not a multiple of rl.num_generations={self.rl.num_generations}: "
                "every prompt's group must be complete in a global batch. Launch a multiple of "
                f"{self.rl.num_generations // math.gcd(self.train.per_device_batch_size, self.rl.num_generations)} "
                "processes or change train.per_device_batch_size."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Loading, overrides, saving


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Check/convert one YAML value against a field type; raise ConfigError naming ``where``."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} may not be null.")
    origin = typing.get_origin(tp)
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


def _build_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"Section {name!r} must be a mapping of field: value, got {values!r}.")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean {name}.{close[0]}?" if close else f" Known fields: {', '.join(known)}."
            raise ConfigError(f"Unknown config key {name}.{key}.{hint}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


_SECTION_CLASSES = {
    "model": ModelConfig, "sampler": SamplerConfig, "rl": RLConfig,
    "task": TaskConfig, "train": TrainConfig, "eval": EvalConfig,
}


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested mapping (as read from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"A config must be a mapping of sections, got {type(data).__name__}.")
    sections = {}
    for key in data:
        if key not in _SECTION_CLASSES:
            close = difflib.get_close_matches(str(key), list(_SECTION_CLASSES), n=1)
            hint = f" Did you mean {close[0]}?" if close else f" Sections: {', '.join(_SECTION_CLASSES)}."
            raise ConfigError(f"Unknown config section {key!r}.{hint}")
    for name, cls in _SECTION_CLASSES.items():
        sections[name] = _build_section(name, cls, data.get(name) or {})
    return Config(**sections)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings (values parsed as YAML) to a nested mapping."""
    data = {k: dict(v or {}) for k, v in data.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} is not of the form section.field=value (e.g. rl.beta=0.0).")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ConfigError(f"Override key {key!r} must be section.field, e.g. train.max_steps.")
        section, name = parts
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"Override {item!r}: value is not valid YAML ({exc}).") from exc
        data.setdefault(section, {})[name] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from exc
    try:
        return config_from_dict(apply_overrides(data, overrides or []))
    except ConfigError as exc:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{exc}{where}") from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (re-loadable with :func:`load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
