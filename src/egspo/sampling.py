"""The LLaDA block low-confidence sampler, recording the diffusion MDP (docs/algorithm.md#diffusion-mdp).

    traj = sample(dlm, prompt_ids, SamplerConfig(gen_length=256, block_length=32, steps=128),
                  attention_mask=prompt_mask, generator=torch.Generator(device).manual_seed(0))

The completion is decoded block by block, left to right; each block gets ``steps / num_blocks``
steps, and each step commits the most confident masked positions of the current block (the numbers
per step spread as evenly as possible, earlier steps taking the remainder). Candidates are drawn by
Gumbel-max at ``temperature`` (0 = argmax); confidence is the candidate's probability under the
untempered softmax (or a uniform draw for ``remasking="random"``).

Per step the LM head runs on the current block (candidates, log-probs, entropies) and, for the
one-step greedy completion, on the remaining masked positions in chunks whose size bounds the memory
of the logits; nothing of vocabulary size outlives the step. What a step commits and records goes
through one :class:`egspo.trajectory.TrajectoryRecorder`; this module decides what to commit.

``config.cache`` selects an APPROXIMATE rollout in the style of Fast-dLLM (native LLaDA/Dream only).
The first step of every block runs the full forward, exactly as ``cache="none"`` does, and keeps
every layer's keys/values; the block's other steps run only part of the sequence against that cache:

- ``prefix``: positions [block start, end of sequence); the prompt and finished blocks come from the
  cache (they do not change within a block, but their cached keys/values were computed while the
  current block still held the masks of the block start);
- ``dual``: the current block only; the prefix and the still-masked suffix come from the cache.

Every step then records what the exact sampler records, computed from these approximate features:
the candidates, log-probs and entropies of the block, and the greedy completion, whose part after the
block comes from this step's features (``prefix``) or, for ``dual``, from the block-start forward
(stale: the suffix is not recomputed within a block, so it is taken once per block). The recorded
log-probs are therefore not the exact model's; the trainer recomputes those of the selected steps.
``config.cache_refresh`` = N remakes the cache with a full (exact) forward every N steps of a block
(1: every step, i.e. the exact rollout). ``config.compile`` runs the forwards through
:meth:`DiffusionLM.compiled_model`; ``config.merge_lora`` runs a LoRA model's rollout on its merged
copy (:meth:`DiffusionLM.for_rollout`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from torch import nn

from egspo.config import ConfigError, SamplerConfig
from egspo.models.adapter import DiffusionLM
from egspo.models.kv_cache import KVCache
from egspo.ops import gumbel_argmax, logprobs_and_entropy
from egspo.trajectory import Trajectory, TrajectoryRecorder, stop_token_mask

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

#: Upper bound on the elements of one chunk of greedy-completion logits (about 256 MB in bf16).
GREEDY_CHUNK_ELEMENTS = 1 << 27
#: Compiled rollouts see one shape per window length (a prefix window per block) and per active-row
#: count; torch's default recompile limit (8) would silently fall back to eager before that.
COMPILE_RECOMPILE_LIMIT = 64


def transfer_schedule(config: SamplerConfig) -> torch.Tensor:
    """(T,) tokens committed at each step: a block's length spread over its steps, remainder first."""
    per_block = config.steps_per_block
    base, rem = divmod(config.block_length, per_block)
    block = torch.full((per_block,), base, dtype=torch.long)
    block[:rem] += 1
    return block.repeat(config.num_blocks)


def _without_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Logits with the mask token's entry set to -inf (a copy; the input is left as it is)."""
    out = logits.clone()
    out[..., mask_id] = float("-inf")
    return out


def _top_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the ``n`` largest scores per row (ties broken as torch.topk does)."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    return chosen.scatter_(1, torch.topk(scores, n, dim=1).indices, True)


class _Step(NamedTuple):
    """Denoising step ``t`` of the block of sequence positions [lo, hi), committing ``n`` tokens per row."""

    t: int
    lo: int
    hi: int
    n: int

    @property
    def block(self) -> slice:
        return slice(self.lo, self.hi)


@torch.no_grad()
def sample(
    dlm: DiffusionLM,
    prompt_ids: torch.Tensor,
    config: SamplerConfig,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    record_greedy: bool = True,
) -> Trajectory:
    """Roll out completions for left-padded ``prompt_ids`` (B, L_p) and record the trajectory.

    ``record_greedy=False`` skips the one-step greedy completions (``traj.greedy`` is then None): they
    cost an LM-head pass over the masked tail per step and only EGSPO-SA's step rewards use them.
    """
    device = prompt_ids.device
    batch, prompt_len = prompt_ids.shape
    if config.cache != "none" and not dlm.native:
        raise ConfigError(
            f"rollout_cache={config.cache!r} needs the native LLaDA or Dream models (egspo.models); this "
            f"model ({type(dlm.core).__name__}) goes through the generic adapter: use rollout_cache=none."
        )
    dlm = dlm.for_rollout(config.merge_lora)  # a LoRA model's merged copy (docs/algorithm.md#merged-lora-rollouts)
    model = rollout_module(dlm, config)

    schedule = transfer_schedule(config).to(device)
    record = TrajectoryRecorder.start(prompt_ids, attention_mask, schedule, mask_id=dlm.mask_id,
                                      stop_ids=dlm.stop_ids, record_greedy=record_greedy)
    # nothing to mask: let attention take its fastest path
    if attention_mask is not None and not bool(record.attention_mask.all()):
        attention_mask = record.attention_mask
    else:
        attention_mask = None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)

    # FSDP / ZeRO-3 gather weights in every forward: all processes must run the same forwards, even
    # one whose rows have all ended (it runs them on scratch copies).
    lockstep = dlm.sharded
    if lockstep and config.cache != "none":
        raise ConfigError(
            f"rollout_cache={config.cache!r} is not supported with a sharded model (FSDP / ZeRO-3): "
            "use rollout_cache=none, or DDP / ZeRO-2."
        )
    chunk_rows = batch if lockstep else None
    counts = schedule.tolist()
    with dlm.evaluating():
        t = 0
        for block in range(config.num_blocks):
            lo, hi = prompt_len + block * config.block_length, prompt_len + (block + 1) * config.block_length
            if config.stop_at_eos and block > 0:
                done = stop_token_mask(record.sequences[:, prompt_len:lo], dlm.stop_ids).any(dim=1)
            active = rows[~done]
            everyone = active.numel() == batch
            mask_a = None if attention_mask is None else (attention_mask if everyone else attention_mask[active])
            cache: KVCache | None = None
            stale_tail: torch.Tensor | None = None  # dual: greedy tokens after the block, from the block start
            for i in range(config.steps_per_block):
                step = _Step(t, lo, hi, counts[t])
                if config.cache_refresh and i % config.cache_refresh == 0:  # remade by an exact forward
                    cache = stale_tail = None
                if done.any():
                    _force_end(record, done, step, dlm.eos_id)
                if active.numel():
                    # the active rows are fixed within a block, so the cache holds exactly them
                    xa = record.sequences if everyone else record.sequences[active]
                    features, cache = _step_features(dlm, model, xa, mask_a, lo, hi, config, cache)
                    tail_greedy = None
                    if record_greedy:
                        tail_greedy = stale_tail if stale_tail is not None else \
                            greedy_tokens(dlm, features[:, hi - lo :], chunk_rows)
                        if config.cache == "dual":
                            stale_tail = tail_greedy
                    _model_step(dlm, record, active, xa, features[:, : hi - lo], tail_greedy, step, config, generator)
                    del features
                elif lockstep:
                    _idle_step(dlm, model, record, attention_mask, step, config)
                t += 1
    return record.to_trajectory()


def rollout_module(dlm: DiffusionLM, config: SamplerConfig) -> nn.Module:
    """The module the rollout forwards of ``dlm`` run through: its model, or its compiled copy."""
    if not config.compile:
        return dlm.model
    dynamo_config = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    if getattr(dynamo_config, name) < COMPILE_RECOMPILE_LIMIT:
        logger.info("Raising torch._dynamo.config.%s to %d for the compiled rollout.", name, COMPILE_RECOMPILE_LIMIT)
        setattr(dynamo_config, name, COMPILE_RECOMPILE_LIMIT)
    return dlm.compiled_model()


def _step_features(
    dlm: DiffusionLM,
    model: nn.Module,
    xa: torch.Tensor,
    mask_a: torch.Tensor | None,
    lo: int,
    hi: int,
    config: SamplerConfig,
    cache: KVCache | None,
) -> tuple[torch.Tensor, KVCache | None]:
    """Aligned features of positions [lo, end) for one denoising step of block [lo, hi), and the cache.

    Without a cache (``rollout_cache=none``, or the first step of a block in the cached modes) the
    whole sequence runs, exactly; the cached modes keep that forward's keys/values for the block's
    other steps, which run [lo, L) (``prefix``) or [lo, hi) (``dual``) against it.
    """
    if cache is None:
        if config.cache == "none":
            return dlm.encode(xa, mask_a, model=model)[:, lo:], None
        full, cache = dlm.encode_cached(xa, mask_a, model=model)
        return full[:, lo:], cache
    end = xa.shape[1] if config.cache == "prefix" else hi
    return dlm.encode_window(xa, lo, end, cache, mask_a, model=model), cache


def greedy_tokens(dlm: DiffusionLM, features: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Argmax tokens (mask excluded) of ``features`` (B, P, H), the LM head run in bounded chunks.

    ``chunk_rows`` sizes the chunks for that many rows instead of B: sharded models (FSDP / ZeRO-3)
    pass the whole batch so that every process makes the same number of head calls."""
    out = torch.empty(features.shape[:2], dtype=torch.long, device=features.device)
    if features.shape[1] == 0:
        return out
    vocab = cast("PreTrainedModel", dlm.core).get_output_embeddings().out_features if dlm.native else features.shape[-1]
    chunk = max(1, GREEDY_CHUNK_ELEMENTS // max(1, (chunk_rows or features.shape[0]) * vocab))
    for start in range(0, features.shape[1], chunk):
        stop = min(start + chunk, features.shape[1])
        out[:, start:stop] = _without_mask(dlm.head(features[:, start:stop]), dlm.mask_id).argmax(-1)
    return out


def _model_step(
    dlm: DiffusionLM,
    record: TrajectoryRecorder,
    active: torch.Tensor,
    xa: torch.Tensor,
    block_features: torch.Tensor,
    tail_greedy: torch.Tensor | None,
    step: _Step,
    config: SamplerConfig,
    generator: torch.Generator | None,
) -> None:
    """One denoising step for the ``active`` rows (``xa`` = their sequences): commit ``step.n`` tokens of
    the block from ``block_features`` (aligned features of the block) and record it; ``tail_greedy`` are
    the greedy tokens after the block (needed when the greedy completions are recorded)."""
    block_logits = dlm.head(block_features)  # (B_a, block, V)
    # the mask token is never a candidate: committing it would leave the position masked
    allowed = _without_mask(block_logits, dlm.mask_id)
    candidates = gumbel_argmax(allowed, config.temperature, generator)
    logps, entropies = logprobs_and_entropy(block_logits, candidates)
    # the untempered argmax for this block doubles as the greedy completion there
    block_greedy = allowed.argmax(-1)
    del allowed
    if config.remasking == "low_confidence":
        # rank in the logits' dtype, as the published sampler does with its softmax
        confidence = logps.exp().to(block_logits.dtype).float()
    else:
        confidence = torch.rand(candidates.shape, generator=generator, device=xa.device)
    del block_logits

    eligible = xa[:, step.block] == dlm.mask_id
    chosen = _top_n(torch.where(eligible, confidence, torch.full_like(confidence, float("-inf"))), step.n)
    if tail_greedy is not None:
        record.record_greedy(active, step.t, step.block, block_greedy, tail_greedy)
    record.commit(active, step.t, step.block, chosen, candidates, logps, entropies)


def _idle_step(
    dlm: DiffusionLM,
    model: torch.nn.Module,
    record: TrajectoryRecorder,
    attention_mask: torch.Tensor | None,
    step: _Step,
    config: SamplerConfig,
) -> None:
    """The forwards of an exact step on a scratch record, results discarded (lockstep, all rows ended).

    All rows, so that the number of head calls (chunks sized by the batch) matches the other processes.
    """
    scratch = record.scratch()
    batch = scratch.sequences.shape[0]
    features, _ = _step_features(dlm, model, scratch.sequences, attention_mask, step.lo, step.hi, config, None)
    tail = greedy_tokens(dlm, features[:, step.hi - step.lo :], batch) if scratch.greedy is not None else None
    # a throwaway generator: with None the candidates would be drawn from the global RNG
    scratch_generator = torch.Generator(device=scratch.sequences.device)
    rows = torch.arange(batch, device=scratch.sequences.device)
    _model_step(dlm, scratch, rows, scratch.sequences, features[:, : step.hi - step.lo], tail, step, config,
                scratch_generator)


def _force_end(record: TrajectoryRecorder, done: torch.Tensor, step: _Step, eos_id: int) -> None:
    """Rows that have ended commit the ``n`` leftmost masked positions of the block as end tokens."""
    masked = record.sequences[done, step.block] == record.mask_id
    # leftmost first: score masked positions by descending index order
    position_score = torch.arange(step.hi - step.lo, 0, -1, device=masked.device, dtype=torch.float).expand_as(masked)
    chosen = _top_n(torch.where(masked, position_score, torch.full_like(position_score, float("-inf"))), step.n)
    record.commit_end(done, step.t, step.block, chosen, eos_id)
