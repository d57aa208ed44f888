"""Memory planner: the peak of one training step estimated before any weight is loaded (``max_memory_gb``).

    plan = plan_memory(model_config_dict, args, device_type="cuda")   # raises MemoryBudgetError if nothing fits
    plan.gradient_checkpointing, plan.estimate.peak, plan.log(logger)

Everything is in bytes internally and reported in GB of 2^30 bytes (what ``torch.cuda`` reports). The
estimate covers the native LLaDA and Dream architectures (egspo.models), one process, whole weights
(DDP; FSDP/ZeRO-3 shards would make it an upper bound).

Notation: ``d`` hidden size, ``h`` MLP width, ``n`` layers, ``E`` LM-head rows (vocabulary), ``B`` rollouts per
device (``per_device_train_batch_size``), ``L = max_prompt_length + max_completion_length`` tokens per row,
``R = B x steps_per_microbatch`` rows of one EGSPO update forward (diffu-GRPO: ``B``), ``P`` LM-head positions
of an update row (EGSPO: the tokens one step commits, ``ceil(block_length / steps per block)``;
diffu-GRPO: the completion), ``N`` trainable parameters.

Held through the step (``static``):
- weights: 2 bytes per parameter (bf16/fp16; 4 for fp32). 4-bit: each block linear weight 0.5 byte per
  parameter plus its scales (bitsandbytes blocks of 64: a float32 scale each, or with double quantisation an
  8-bit scale each plus a float32 per 256 blocks); 8-bit: 1 byte plus a float32 scale per output row;
  embedding, LM head and norms stay in the load dtype (transformers never quantises the LM head).
- LoRA: N = sum over adapted linears of r (in + out) (LLaDA's default targets include the LM head, whose
  name ``ff_out`` is also the blocks' MLP output). peft keeps adapters in float32: 4 N for the weights,
  4 N for their gradients (only while updating: the last optimizer step of a step frees them), 8 N for
  AdamW's two moments, and under bf16 autocast 2 N for autocast's cached bf16 copies of the adapter
  weights (kept for as long as an autocast region lasts: the whole rollout, one update micro-batch).
- ``merge_lora_rollout`` (LoRA on an unquantised base): the merged copy of every adapted weight that the
  rollouts run on, in the weights' dtype (``egspo.models.merged``).
- Full fine-tuning: gradients and both AdamW moments in the weights' dtype (3 x the weights), plus a frozen
  copy of the weights as the KL reference when ``beta > 0``. With LoRA the reference is the same model
  with the adapter disabled: no copy (also for a 4-bit base).

Rollout working memory (no gradients; the largest of its phases, plus what the phases share):
- the final hidden states of a forward, which accelerate's mixed-precision wrapper returns in float32:
  6 B L d (the bf16 original and the float32 copy for a moment);
- the largest of: one forward's transients 8 (h + d) B L (peft's float32 copy and bf16 cast of a linear's
  input, the MLP's intermediates); the LM head on the current block, 20 B x block_length x E (bf16 logits,
  the mask-free copy, float32 Gumbel noise and log-softmax); one greedy-completion chunk, 4 x
  ``egspo.sampling.GREEDY_CHUNK_ELEMENTS`` (bf16 logits and their mask-free copy; 2^27 elements, a module
  constant, not a setting; EGSPO-SA only);
- ``rollout_cache`` prefix/dual: the keys/values of every layer, 2 n B L kv_dim x 2 bytes, held for a block,
  and three times that at a block's first step (accelerate returns the cache in float32 before the sampler
  casts it back);
- 4-bit: one dequantised weight (2 bytes x the largest linear), twice with a backward pass.

Update working memory of one micro-batch (the forward and backward of R rows x L tokens):
- saved activations per token and layer, measured on CPU with ``torch.autograd.graph.saved_tensors_hooks``
  on LLaDA blocks (and checked against the H100 figures of docs/benchmarks.md, LoRA r 128 with dropout
  0.05, memory above the weights and adapter: 6 rollouts without checkpointing 25.4 GB estimated vs 25.6
  measured, 48 rollouts with checkpointing 17.9 vs 18.3), bf16 autocast on CUDA:
  LoRA on a bf16 base: 16 d + 6 h (both norms' float32 inputs, SDPA's q/k/v/out, the MLP's three
  h-wide intermediates) plus 2 x in for every adapted linear (peft casts the input to float32, autocast
  makes a bf16 copy that the adapter keeps); LoRA on a 4-bit/8-bit base: 16 d + 6 h plus 2 x in once per
  distinct adapted input (peft's bitsandbytes layers skip the cast under autocast, so q/k/v share theirs);
  lora_dropout > 0 adds a 1-byte mask per adapted input element and unshares the inputs (3 x in each);
  full fine-tuning: 24 d + 8 h. Without autocast (float32 weights, e.g. on CPU): LoRA 32 d + 16 h,
  full 40 d + 16 h. An 8-bit base adds 3 x in per linear (bitsandbytes' int8 matmul keeps its input and
  an int8 transpose: from its source, not measured).
  Without gradient checkpointing all n layers keep theirs; with it each layer keeps only its input
  (2 d bytes, bf16) and one layer's activations are recomputed at a time.
- backward transients of one layer: 8 (h + d) R L (fitted to the checkpointed 48-rollout H100 figure);
- the LM-head logits at P positions: 12 R P E (bf16 logits, accelerate's float32 copy that the chunked
  log-prob keeps, its float32 and bf16 gradients), 4 R P E more with ``kl_estimator: exact`` (the
  reference's logits), plus one ``egspo.ops.LOGPROB_CHUNK_ELEMENTS`` float32 chunk (64 MB, a constant).

Optimizer step: AdamW's foreach implementation makes one temporary the size of the trainable parameters.

peak = max(rollout, update, optimizer step), static memory held in all three (gradients not in the
rollout: the last optimizer step of a training step frees them). A plan fits when ``peak x 1.05 + 0.25 GB``
(allocator fragmentation, cuBLAS workspaces) is within the budget.

The planner chooses gradient checkpointing: off when the step fits without it, on when only that fits
(a configured ``gradient_checkpointing: true`` is kept). It keeps the merged LoRA rollout copy when the step
fits with it (checkpointing on if need be: the copy saves more time than checkpointing costs) and drops it
otherwise. Everything else stays as configured: the update
micro-batch is ``per_device_train_batch_size x steps_per_microbatch`` rows in one forward (the trainer does
not split rows), and the greedy and log-prob chunk sizes are module constants. When nothing fits,
:class:`MemoryBudgetError` names the smallest budget for the run as configured and what would fit the
given budget (a smaller batch or LoRA rank, or a 4-bit base).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from egspo.config import ConfigError, EGSPOConfig
from egspo.models.lora import DEFAULT_LORA_TARGETS, PUBLISHED_LORA_TARGETS
from egspo.ops import LOGPROB_CHUNK_ELEMENTS
from egspo.sampling import GREEDY_CHUNK_ELEMENTS

logger = logging.getLogger(__name__)

GB = 2**30
#: Headroom of a plan: the caching allocator's fragmentation and cuBLAS workspaces.
FRAGMENTATION = 0.05
WORKSPACE_BYTES = GB // 4
#: bitsandbytes' 4-bit block size (one scale per block).
BNB_BLOCK = 64
#: Blocks per second-level scale under double quantisation.
BNB_NESTED_BLOCKS = 256


class MemoryBudgetError(ConfigError):
    """``max_memory_gb`` is too small for a training step; the message says what would fit."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a native model's config: sizes and its linear layers."""

    model_type: str
    hidden: int
    layers: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    #: Linear layers of one block: name -> (in, out, has bias), in forward order.
    linears: dict[str, tuple[int, int, bool]]
    #: Groups of block linears that read the same input tensor (q/k/v; the MLP's two input projections).
    shared_inputs: tuple[tuple[str, ...], ...]
    head_name: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """The shape of a LLaDA or Dream ``config.json`` (as a dict); other architectures are refused."""
        model_type = config.get("model_type")
        if model_type == "llada":
            d, heads = int(config["d_model"]), int(config["n_heads"])
            kv = config.get("n_kv_heads")
            kv = int(kv) if kv is not None else (1 if config.get("multi_query_attention") else heads)
            h = config.get("mlp_hidden_size") or int(config.get("mlp_ratio", 4)) * d
            vocab = config.get("embedding_size") or config["vocab_size"]
            bias = bool(config.get("include_bias", False))
            qkv_bias = bias or bool(config.get("include_qkv_bias", False))
            hd = d // heads
            linears = {"q_proj": (d, d, qkv_bias), "k_proj": (d, kv * hd, qkv_bias), "v_proj": (d, kv * hd, qkv_bias),
                       "attn_out": (d, d, bias), "ff_proj": (d, int(h), bias), "up_proj": (d, int(h), bias),
                       "ff_out": (int(h), d, bias)}
            return cls("llada", d, int(config["n_layers"]), int(h), heads, kv, hd, int(vocab),
                       bool(config.get("weight_tying", False)), linears,
                       (("q_proj", "k_proj", "v_proj"), ("ff_proj", "up_proj")), "ff_out")
        if model_type == "Dream":
            d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            kv = int(config.get("num_key_value_heads") or heads)
            h, hd = int(config["intermediate_size"]), d // heads
            linears = {"q_proj": (d, heads * hd, True), "k_proj": (d, kv * hd, True), "v_proj": (d, kv * hd, True),
                       "o_proj": (heads * hd, d, False), "gate_proj": (d, h, False), "up_proj": (d, h, False),
                       "down_proj": (h, d, False)}
            return cls("Dream", d, int(config["num_hidden_layers"]), h, heads, kv, hd, int(config["vocab_size"]),
                       bool(config.get("tie_word_embeddings", False)), linears,
                       (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")), "lm_head")
        raise ConfigError(
            f"max_memory_gb plans the memory of the native LLaDA and Dream models; model_type {model_type!r} is "
            "neither: unset max_memory_gb (the estimate would not hold for it).")

    @property
    def block_linear_params(self) -> int:
        return self.layers * sum(i * o for i, o, _ in self.linears.values())

    @property
    def other_params(self) -> int:
        """Embedding, LM head (untied), norms and biases: what quantisation leaves in the load dtype."""
        embedding = self.vocab * self.hidden
        head = 0 if self.tied else embedding
        norms = (2 * self.layers + 1) * self.hidden
        biases = self.layers * sum(o for _, o, b in self.linears.values() if b)
        return embedding + head + norms + biases

    @property
    def params(self) -> int:
        return self.block_linear_params + self.other_params

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


@dataclass(frozen=True)
class Setting:
    """The run settings the estimate depends on (taken from an :class:`EGSPOConfig`, then varied)."""

    rows: int
    prompt_length: int
    completion_length: int
    block_length: int
    steps: int
    steps_per_microbatch: int
    diffu_grpo: bool
    greedy: bool
    kv_cache: bool
    exact_kl: bool
    reference_copy: bool
    #: LoRA rank and the block linears it adapts (None: full fine-tuning); whether the head is adapted.
    lora_r: int | None
    lora_targets: frozenset[str]
    lora_head: bool
    lora_dropout: bool
    #: the rollouts run on a merged copy of the adapted weights (``merge_lora_rollout``)
    merged_lora: bool
    #: "float32", "bfloat16", "float16", "4bit" or "8bit" (the block linears), float dtype of the rest.
    weights: str
    other_bytes: int
    double_quant: bool
    autocast: bool
    gradient_checkpointing: bool

    @property
    def length(self) -> int:
        return self.prompt_length + self.completion_length

    @property
    def update_rows(self) -> int:
        return self.rows if self.diffu_grpo else self.rows * self.steps_per_microbatch

    @property
    def head_positions(self) -> int:
        if self.diffu_grpo:
            return self.completion_length
        steps_per_block = self.steps // (self.completion_length // self.block_length)
        return math.ceil(self.block_length / steps_per_block)

    @property
    def quantized(self) -> bool:
        return self.weights in ("4bit", "8bit")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component: ``static`` (held through the step) and the working memory of the step's three
    phases, ``rollout``, ``update`` (one micro-batch) and ``optimizer`` (an AdamW step)."""

    static: dict[str, int]
    rollout: dict[str, int]
    update: dict[str, int]
    optimizer: dict[str, int]
    gradient_checkpointing: bool

    @property
    def rollout_peak(self) -> int:
        # the last optimizer step of the previous training step freed the gradients
        return sum(v for k, v in self.static.items() if k != "gradients") + sum(self.rollout.values())

    @property
    def update_peak(self) -> int:
        return sum(self.static.values()) + sum(self.update.values())

    @property
    def optimizer_peak(self) -> int:
        return sum(self.static.values()) + sum(self.optimizer.values())

    @property
    def peak(self) -> int:
        return max(self.rollout_peak, self.update_peak, self.optimizer_peak)

    @property
    def needed(self) -> int:
        """The budget this estimate needs, headroom included."""
        return int(self.peak * (1 + FRAGMENTATION)) + WORKSPACE_BYTES

    def breakdown(self) -> str:
        """Every component in GB, by phase."""
        def parts(d: dict[str, int]) -> str:
            return ", ".join(f"{k} {v / GB:.2f}" for k, v in d.items() if v)

        return (f"held {parts(self.static)}; rollout {parts(self.rollout)}; update {parts(self.update)}; "
                f"optimizer step {parts(self.optimizer)}")

    def summary(self) -> str:
        """The peak, each phase's peak and the breakdown, in GB."""
        return (f"peak {self.peak / GB:.2f} GB (rollout {self.rollout_peak / GB:.2f}, "
                f"update {self.update_peak / GB:.2f}, optimizer step {self.optimizer_peak / GB:.2f}; "
                f"{self.breakdown()})")

    def to_dict(self) -> dict[str, Any]:
        def gb(d: dict[str, int]) -> dict[str, float]:
            return {k: round(v / GB, 3) for k, v in d.items()}

        return {"peak_gb": round(self.peak / GB, 3), "rollout_peak_gb": round(self.rollout_peak / GB, 3),
                "update_peak_gb": round(self.update_peak / GB, 3),
                "optimizer_peak_gb": round(self.optimizer_peak / GB, 3), "needed_gb": round(self.needed / GB, 3),
                "static_gb": gb(self.static), "rollout_gb": gb(self.rollout), "update_gb": gb(self.update),
                "optimizer_gb": gb(self.optimizer), "gradient_checkpointing": self.gradient_checkpointing}


@dataclass(frozen=True)
class MemoryPlan:
    """What the planner chose for a budget, with the estimate it chose by and why."""

    budget_gb: float
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    update_rows: int
    reasons: tuple[str, ...] = field(default=())
    #: whether rollouts run on the merged LoRA copy (False also when there is nothing to merge)
    merge_lora_rollout: bool = False

    def log(self, log: logging.Logger = logger) -> None:
        log.info("Memory plan for max_memory_gb=%g: %s", self.budget_gb, self.estimate.summary())
        for reason in self.reasons:
            log.info("Memory plan: %s", reason)

    def to_dict(self) -> dict[str, Any]:
        return {"budget_gb": self.budget_gb, "gradient_checkpointing": self.gradient_checkpointing,
                "merge_lora_rollout": self.merge_lora_rollout,
                "update_rows": self.update_rows, "estimate": self.estimate.to_dict(), "reasons": list(self.reasons)}


# -- the estimate --------------------------------------------------------------------------------


def estimate_memory(shape: ModelShape, s: Setting) -> MemoryEstimate:
    """The estimate of one training step (module docstring)."""
    static = _static(shape, s)
    # AdamW's foreach step makes one temporary the size of the trainable parameters (sqrt of the 2nd moment)
    optimizer = {"adamw_temporary": static["gradients"]}
    return MemoryEstimate(static, _rollout(shape, s), _update(shape, s), optimizer, s.gradient_checkpointing)


def _weight_bytes(shape: ModelShape, s: Setting) -> int:
    linear = shape.block_linear_params
    if s.weights == "4bit":
        blocks = linear / BNB_BLOCK
        scales = blocks * 1 + blocks / BNB_NESTED_BLOCKS * 4 if s.double_quant else blocks * 4
        linear_bytes = linear / 2 + scales
    elif s.weights == "8bit":
        rows = shape.layers * sum(o for _, o, _ in shape.linears.values())
        linear_bytes = linear + 4 * rows
    else:
        linear_bytes = linear * _DTYPE_BYTES[s.weights]
    return int(linear_bytes + shape.other_params * s.other_bytes)


def lora_params(shape: ModelShape, r: int, targets: Iterable[str], head: bool) -> int:
    """Trainable parameters of a rank-``r`` adapter on ``targets`` (block linear names) and the head."""
    per_block = sum(r * (shape.linears[name][0] + shape.linears[name][1]) for name in targets)
    return shape.layers * per_block + (r * (shape.hidden + shape.vocab) if head else 0)


def _static(shape: ModelShape, s: Setting) -> dict[str, int]:
    weights = _weight_bytes(shape, s)
    out = {"weights": weights}
    if s.lora_r is None:
        grad_bytes = shape.params * s.other_bytes
        out.update(reference=weights if s.reference_copy else 0, gradients=grad_bytes, adamw_state=2 * grad_bytes,
                   bf16_cast=2 * shape.params if s.autocast and s.other_bytes == 4 else 0)
        return out
    n = lora_params(shape, s.lora_r, s.lora_targets, s.lora_head)
    out.update(adapter=4 * n, gradients=4 * n, adamw_state=8 * n, bf16_cast=2 * n if s.autocast else 0)
    if s.merged_lora:
        adapted = sum(shape.linears[name][0] * shape.linears[name][1] for name in s.lora_targets)
        out["merged_copy"] = (shape.layers * adapted + (shape.hidden * shape.vocab if s.lora_head else 0)) \
            * s.other_bytes
    return out


def _rollout(shape: ModelShape, s: Setting) -> dict[str, int]:
    tokens = s.rows * s.length
    d, h, e = shape.hidden, shape.mlp, shape.vocab
    phases = {"forward": 8 * (h + d) * tokens, "block_logits": 20 * s.rows * s.block_length * e}
    if s.greedy:
        tail = s.completion_length - s.block_length
        positions = min(tail, max(1, GREEDY_CHUNK_ELEMENTS // (s.rows * e)))
        phases["greedy_chunk"] = 4 * positions * s.rows * e
    largest = max(phases, key=lambda name: phases[name])
    out = {"hidden_states": (6 if s.autocast else 4) * tokens * d, largest: phases[largest]}
    if s.kv_cache:
        cache = 2 * shape.layers * tokens * shape.kv_dim * 2
        out["kv_cache"] = (3 if s.autocast else 1) * cache
    if s.quantized:
        out["dequantized_weight"] = 2 * _largest_linear(shape)
    return out


def activation_bytes_per_token(shape: ModelShape, s: Setting) -> int:
    """Saved activations of one layer per token in an update forward (module docstring)."""
    d, h = shape.hidden, shape.mlp
    lse = 4 * shape.heads
    if s.lora_r is None:
        base = (24 * d + 8 * h) if s.autocast or s.weights != "float32" else (40 * d + 16 * h)
        return base + lse + _int8_inputs(shape, s)
    if not s.autocast and s.weights == "float32":
        masks = 8 * sum(shape.linears[n][0] for n in s.lora_targets) if s.lora_dropout else 0
        return 32 * d + 16 * h + lse + masks
    base = 16 * d + 6 * h + lse
    adapted = [n for n in shape.linears if n in s.lora_targets]
    if s.lora_dropout:
        per_input = 2 if s.autocast else 4
        return base + sum((per_input + 1) * shape.linears[n][0] for n in adapted) + _int8_inputs(shape, s)
    if s.quantized and s.autocast:
        groups = _input_groups(shape, adapted)
        return base + sum(2 * shape.linears[g[0]][0] for g in groups) + _int8_inputs(shape, s)
    per_input = 2 if s.autocast else 4
    return base + sum(per_input * shape.linears[n][0] for n in adapted) + _int8_inputs(shape, s)


def _int8_inputs(shape: ModelShape, s: Setting) -> int:
    return 3 * sum(i for i, _, _ in shape.linears.values()) if s.weights == "8bit" else 0


def _input_groups(shape: ModelShape, adapted: list[str]) -> list[tuple[str, ...]]:
    """The distinct input tensors of the adapted linears (linears in one shared group read one tensor)."""
    groups: list[tuple[str, ...]] = []
    for name in adapted:
        group = next((g for g in shape.shared_inputs if name in g), (name,))
        if group not in groups:
            groups.append(group)
    return groups


def _update(shape: ModelShape, s: Setting) -> dict[str, int]:
    tokens = s.update_rows * s.length
    per_layer = activation_bytes_per_token(shape, s) * tokens
    act_bytes = 2 if s.autocast or s.weights != "float32" else 4
    if s.gradient_checkpointing:
        activations = shape.layers * act_bytes * shape.hidden * tokens + per_layer
    else:
        activations = shape.layers * per_layer
    logits = s.update_rows * s.head_positions * shape.vocab
    out = {
        "activations": activations,
        "backward": 8 * (shape.mlp + shape.hidden) * tokens,
        "logits": (16 if s.exact_kl else 12) * logits + 4 * LOGPROB_CHUNK_ELEMENTS,
    }
    if s.quantized:
        out["dequantized_weight"] = 2 * 2 * _largest_linear(shape)
    return out


def _largest_linear(shape: ModelShape) -> int:
    return max(i * o for i, o, _ in shape.linears.values())


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# -- from a run configuration --------------------------------------------------------------------


def setting_from_args(shape: ModelShape, args: EGSPOConfig, *, device_type: str = "cuda",
                      mixed_precision: bool | None = None, peft_config: Any = None,
                      quantized_bits: int | None = None) -> Setting:
    """The :class:`Setting` of ``args`` for ``shape``.

    ``device_type`` and ``mixed_precision`` (bf16 autocast; default: on for CUDA unless ``bf16: false``) say
    where the run goes; ``peft_config`` (a ``LoraConfig``) replaces the ``lora_*`` fields as in the trainer;
    ``quantized_bits`` (4 or 8) describes an already-loaded quantised model.
    """
    cuda = device_type == "cuda"
    autocast = (args.bf16 if args.bf16 is not None else cuda) if mixed_precision is None else mixed_precision
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if cuda else "float32")
    bits = quantized_bits or (4 if args.load_in_4bit else 8 if args.load_in_8bit else None)
    weights = f"{bits}bit" if bits else dtype
    other_bytes = _DTYPE_BYTES[dtype]
    if bits and "float16" in (dtype, args.bnb_4bit_compute_dtype):
        other_bytes = 4  # float16 quantised runs keep norms, embedding and head in float32 (egspo.models.lora)
    lora = args.use_peft or peft_config is not None
    r, dropout = None, False
    targets: frozenset[str] = frozenset()
    head = False
    if lora:
        r = int(peft_config.r) if peft_config is not None else args.lora_r
        names = peft_config.target_modules if peft_config is not None else args.lora_target_modules
        targets, head = _resolve_targets(shape, names)
        dropout = (peft_config.lora_dropout if peft_config is not None else args.lora_dropout) > 0
    return Setting(
        rows=args.per_device_train_batch_size, prompt_length=args.max_prompt_length,
        completion_length=args.max_completion_length, block_length=args.block_length, steps=args.diffusion_steps,
        steps_per_microbatch=args.steps_per_microbatch, diffu_grpo=args.algorithm == "diffu_grpo",
        greedy=args.algorithm != "diffu_grpo" and bool(args.stepwise_lambda), kv_cache=args.rollout_cache != "none",
        exact_kl=args.kl_estimator == "exact" and args.beta > 0,
        reference_copy=not lora and args.beta > 0, lora_r=r, lora_targets=targets, lora_head=head,
        lora_dropout=dropout, merged_lora=lora and args.merge_lora_rollout and not bits,
        weights=weights, other_bytes=other_bytes, double_quant=args.bnb_4bit_use_double_quant,
        autocast=autocast, gradient_checkpointing=args.gradient_checkpointing,
    )


def _resolve_targets(shape: ModelShape, names: Any) -> tuple[frozenset[str], bool]:
    """(adapted block linears, head adapted) for ``lora_target_modules`` as peft matches them (by name
    suffix); a regular expression or an unknown name counts every block linear (an upper bound)."""
    if names in (None, [], ()):
        names = DEFAULT_LORA_TARGETS[shape.model_type]
    elif list(names) == ["published"]:
        names = PUBLISHED_LORA_TARGETS
    if isinstance(names, str):
        return frozenset(shape.linears), False  # "all-linear" (never the head) or a regex
    if list(names) == ["all-linear"]:
        return frozenset(shape.linears), False
    leaves = {str(n).rsplit(".", 1)[-1] for n in names}
    return frozenset(n for n in shape.linears if n in leaves), shape.head_name in leaves


# -- the plan ------------------------------------------------------------------------------------


def plan_memory(model_config: Mapping[str, Any], args: EGSPOConfig, **setting_kwargs: Any) -> MemoryPlan:
    """The settings that fit ``args.max_memory_gb`` (see the module docstring); raises
    :class:`MemoryBudgetError` with the smallest settings that would fit when nothing does."""
    budget_gb = args.max_memory_gb
    if budget_gb is None or budget_gb <= 0:
        raise ConfigError(f"max_memory_gb={budget_gb!r} must be a number of GB > 0.")
    shape = ModelShape.from_config(model_config)
    setting = setting_from_args(shape, args, **setting_kwargs)
    budget = int(budget_gb * GB)
    reasons = [_update_rows_reason(setting), _chunk_reason(setting)]
    merge_reason = None
    if setting.merged_lora:
        # the merged rollout copy saves ~15% of rollout time, checkpointing costs ~30% of update time, and the
        # rollout is most of a step: keep the copy if it fits in either checkpointing mode, else drop it
        best_merged = estimate_memory(shape, dataclasses.replace(setting, gradient_checkpointing=True))
        if best_merged.needed > budget:
            setting = dataclasses.replace(setting, merged_lora=False)
            merge_reason = (f"merged LoRA rollout copy OFF: with it the step needs {best_merged.needed / GB:.1f} GB "
                            "with headroom even with gradient checkpointing; rollouts run through the adapter.")
        else:
            merge_reason = (f"merged LoRA rollout copy ON ({best_merged.static['merged_copy'] / GB:.1f} GB): it fits.")
    plain = estimate_memory(shape, dataclasses.replace(setting, gradient_checkpointing=False))
    checkpointed = estimate_memory(shape, dataclasses.replace(setting, gradient_checkpointing=True))
    if setting.gradient_checkpointing:
        chosen = checkpointed
        reasons.insert(0, "gradient checkpointing ON: gradient_checkpointing=true is set (it is never switched off).")
    elif plain.needed <= budget:
        chosen = plain
        reasons.insert(0, f"gradient checkpointing OFF: the step fits without it ({plain.needed / GB:.1f} GB with "
                          "headroom), and recomputing activations would cost about 30% more update time.")
    else:
        chosen = checkpointed
        reasons.insert(0, f"gradient checkpointing ON: without it the update needs {plain.needed / GB:.1f} GB with "
                          f"headroom, with it {checkpointed.needed / GB:.1f} GB.")
    if merge_reason is not None:
        reasons.insert(1, merge_reason)
    if chosen.needed > budget:
        raise MemoryBudgetError(_refusal(shape, setting, chosen, budget_gb))
    return MemoryPlan(budget_gb, chosen.gradient_checkpointing, chosen, setting.update_rows, tuple(reasons),
                      merge_lora_rollout=setting.merged_lora)


def _update_rows_reason(s: Setting) -> str:
    if s.diffu_grpo:
        return (f"update forward: {s.update_rows} rows (per_device_train_batch_size) x {s.length} tokens in one "
                "forward; the trainer does not split rows of a micro-batch.")
    return (f"update forward: {s.update_rows} rows (per_device_train_batch_size {s.rows} x steps_per_microbatch "
            f"{s.steps_per_microbatch}) x {s.length} tokens in one forward; the trainer does not split rows of a "
            "micro-batch, so steps_per_microbatch is kept as configured.")


def _chunk_reason(s: Setting) -> str:
    greedy = (f"greedy-completion chunks of {GREEDY_CHUNK_ELEMENTS * 2 / 2**20:.0f} MB of bf16 logits"
              if s.greedy else "no greedy completions (diffu-GRPO or stepwise_lambda=0)")
    return (f"{greedy} and log-prob chunks of {LOGPROB_CHUNK_ELEMENTS * 4 / 2**20:.0f} MB (fixed by "
            "egspo.sampling.GREEDY_CHUNK_ELEMENTS / egspo.ops.LOGPROB_CHUNK_ELEMENTS, not settings) are counted.")


def _refusal(shape: ModelShape, s: Setting, best: MemoryEstimate, budget_gb: float) -> str:
    budget = int(budget_gb * GB)
    text = (f"max_memory_gb={budget_gb:g} is too small for one training step of this run: the estimated peak is "
            f"{best.peak / GB:.1f} GB{' with gradient checkpointing' if best.gradient_checkpointing else ''} "
            f"({best.breakdown()}), so it needs max_memory_gb >= {math.ceil(best.needed / GB * 10) / 10:g}.")
    options = []
    rows = _largest_fitting(range(s.rows - 1, 0, -1), lambda b: dataclasses.replace(s, rows=b), shape, budget)
    if rows is not None:
        options.append(f"per_device_train_batch_size={rows} (launch enough processes that every group of "
                       "num_generations rollouts is complete)")
    if s.lora_r is not None:
        ranks = [r for r in (2**k for k in range(12, -1, -1)) if r < s.lora_r]
        rank = _largest_fitting(ranks, lambda r: dataclasses.replace(s, lora_r=r), shape, budget)
        if rank is not None:
            options.append(f"lora_r={rank}")
    if not s.quantized and s.lora_r is not None:
        need = estimate_memory(shape, dataclasses.replace(s, weights="4bit", gradient_checkpointing=True)).needed
        if need <= budget:
            options.append(f"load_in_4bit=true (about {need / GB:.1f} GB)")
    if options:
        return text + f" Within {budget_gb:g} GB, with gradient checkpointing, one of these fits: {'; '.join(options)}."
    weights = best.static["weights"]
    if weights * (1 + FRAGMENTATION) + WORKSPACE_BYTES > budget:
        return text + (f" Within {budget_gb:g} GB nothing fits: the base weights alone take {weights / GB:.1f} GB"
                       + (", 4-bit ones included." if s.quantized else "; try load_in_4bit=true with LoRA."))
    return text + (f" Within {budget_gb:g} GB no smaller batch or LoRA rank fits: the weights and the trainable "
                   "state take most of it.")


def _largest_fitting(candidates: Iterable[Any], make: Any, shape: ModelShape, budget: int) -> Any:
    for value in candidates:
        setting = dataclasses.replace(make(value), gradient_checkpointing=True)
        if estimate_memory(shape, setting).needed <= budget:
            return value
    return None
